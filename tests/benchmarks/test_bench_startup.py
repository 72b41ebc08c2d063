"""CPU smoke test of ``benchmarks/bench_startup.py``: the four child processes run, the JSON has
what it promises, and the children show what each variant does (no dynamo when Megatron is
imported uncompiled). No timing is asserted."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_startup.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_startup", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_repeat_writes_times_ratios_and_what_each_child_imported(tmp_path):
    bench = _load()
    out = tmp_path / "startup.json"
    returned = bench.main(["--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))  # what main() returns is what it wrote
    assert list(result["seconds"]) == list(bench.VARIANTS)
    assert all(len(result["all_seconds"][v]) == 1 and result["seconds"][v] > 0
               for v in bench.VARIANTS)  # fmt: skip
    seconds, ratios = result["seconds"], result["ratios"]
    assert ratios["uncompiled/compiled"] == seconds["uncompiled_collected"] / seconds[
        "compiled_collected"]  # fmt: skip
    assert ratios["frozen/collected"] == seconds["uncompiled_frozen"] / seconds[
        "uncompiled_collected"]  # fmt: skip
    assert ratios["both/neither"] == seconds["uncompiled_frozen"] / seconds["compiled_collected"]
    children = result["children"]
    # Imported as released, Megatron's torch.compile decorations pull in dynamo; uncompiled not.
    assert children["compiled_collected"]["dynamo_imported"] is True
    assert children["compiled_frozen"]["dynamo_imported"] is True
    assert children["uncompiled_collected"]["dynamo_imported"] is False
    assert children["uncompiled_frozen"]["dynamo_imported"] is False
    assert children["uncompiled_frozen"]["modules"] < children["compiled_frozen"]["modules"]
