"""The grid file of a scaling sweep: reading, validating and expanding it into runs.

A grid names sizes, token budgets and variants; every (size, budget, variant) is one run of
``examples/recipes/run.sh`` with its own ``OUT_DIR``. A bad file raises ``SweepError`` naming the
key at fault and what to change.
"""

from __future__ import annotations

import difflib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "examples" / "recipes" / "run.sh"
RECIPES = ROOT / "examples" / "recipes"
VARIANTS = ("mhc", "mhc-lite", "hc", "residual")
# The grid file's keys: what each holds (for error messages).
KEYS = {
    "recipe": "the recipe of every size (examples/recipes/<recipe>.sh), e.g. tiny",
    "sizes": "a mapping of size names to pretrain_mhc.py arguments (or {recipe:, args:})",
    "budgets": "a mapping of budget names to arguments, e.g. {short: [--train-iters, 20]}",
    "variants": "a list of variants: mhc, mhc-lite, hc, residual",
    "baseline": "the variant the others are compared with (default residual when listed)",
    "args": "arguments for every run, before the size's and the budget's",
    "env": "environment for run.sh (DATA_PATH, NPROC_PER_NODE, TP, EP, ...)",
    "cpu": "true to train on CPU (run.sh's CPU=1)",
    "out_dir": "where the runs and results go (relative to the repository root)",
    "slurm": "sbatch options of the array job, e.g. {time: '04:00:00', gpus-per-node: 8}",
}
REQUIRED = ("sizes", "budgets", "variants")
NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")  # no '-': it joins size, budget and variant
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the sweep for each run (what to use instead); taking them from the grid would break the
# layout.
SWEEP_ENV = {
    "VARIANT": "list the variants under 'variants'",
    "OUT_DIR": "set out_dir; each run gets OUT_DIR/runs/SIZE-BUDGET-VARIANT",
    "CPU": "set cpu: true",
    "MASTER_PORT": "each local run gets a free port, each array task its own",
}
SWEEP_ARGS = {
    "--mhc-variant": "list the variants under 'variants'",
    "--tensorboard-dir": "the sweep keeps each run's TensorBoard events in its run directory",
}


class SweepError(Exception):
    """A problem with the grid or the runs; the message says what to change."""


@dataclass(frozen=True)
class Run:
    """One training run of the grid.

    Attributes:
        index: its position in the grid, the SLURM array task that runs it.
        name: ``SIZE-BUDGET-VARIANT``.
        size: the size's name in the grid.
        budget: the budget's name in the grid.
        variant: one of VARIANTS.
        recipe: ``examples/recipes/<recipe>.sh``.
        args: pretrain_mhc.py arguments after the recipe's: the grid's common args, then the
            size's, then the budget's (later ones override).
        env: run.sh's environment for this run (the grid's env, VARIANT, OUT_DIR, CPU).
        run_dir: the run's ``OUT_DIR``.
        log: its ``train.log``, appended to by every launch.
    """

    index: int
    name: str
    size: str
    budget: str
    variant: str
    recipe: str
    args: tuple[str, ...]
    env: dict[str, str]
    run_dir: str
    log: str

    def command(self) -> list[str]:
        """The command line of the run, the same locally and in a SLURM array task."""
        return [
            "env",
            *(f"{k}={v}" for k, v in self.env.items()),
            str(RUN_SH),
            self.recipe,
            *self.args,
        ]


@dataclass
class Grid:
    """A parsed and validated grid file.

    Attributes:
        path: the grid file, absolute.
        out_dir: where the runs and results go.
        variants: the variants, in the file's order.
        baseline: the variant the others are compared with (None: no comparison).
        sizes: ``{name: (recipe, args)}``.
        budgets: ``{name: args}``.
        args: arguments for every run, before the size's and the budget's.
        env: run.sh's environment for every run.
        cpu: train on CPU (run.sh's ``CPU=1``).
        slurm: sbatch options of the array job, ``{option: value}``.
    """

    path: Path
    out_dir: Path
    variants: list[str]
    baseline: str | None
    sizes: dict[str, tuple[str, list[str]]]
    budgets: dict[str, list[str]]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cpu: bool = False
    slurm: dict[str, str] = field(default_factory=dict)

    def runs(self) -> list[Run]:
        """Every (size, budget, variant), in that nesting order (the array task order)."""
        runs = []
        for size, (recipe, size_args) in self.sizes.items():
            for budget, budget_args in self.budgets.items():
                for variant in self.variants:
                    name = f"{size}-{budget}-{variant}"
                    run_dir = self.out_dir / "runs" / name
                    env = {**self.env, "VARIANT": variant, "OUT_DIR": str(run_dir)}
                    if self.cpu:
                        env["CPU"] = "1"
                    runs.append(
                        Run(
                            index=len(runs),
                            name=name,
                            size=size,
                            budget=budget,
                            variant=variant,
                            recipe=recipe,
                            args=(*self.args, *size_args, *budget_args),
                            env=env,
                            run_dir=str(run_dir),
                            log=str(run_dir / "train.log"),
                        )
                    )
        return runs


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SweepError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one "
                    f"mapping (first on line {seen[key]}): give each entry a different name"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _known_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.sh") if p.stem not in ("common", "run"))


def _check_recipe(recipe: object, where: str) -> str:
    if not isinstance(recipe, str) or recipe not in _known_recipes():
        raise SweepError(
            f"{where}: no recipe {recipe!r} in examples/recipes; use one of "
            f"{', '.join(_known_recipes())}"
        )
    return recipe


def _arg_list(value: object, where: str) -> list[str]:
    """pretrain_mhc.py arguments from a YAML list of scalars or one shell-quoted string."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if not isinstance(value, list):
        raise SweepError(
            f"{where} must be a list of arguments, e.g. [--num-layers, 2], or one string; "
            f"got {type(value).__name__}"
        )
    out = []
    for i, item in enumerate(value):
        # bool is an int too, and YAML reads yes/no/true as bools: a flag must be a string.
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise SweepError(
                f"{where}[{i}] = {item!r} is not a string or a number: quote it "
                f"(e.g. '--sequence-parallel', \"([0]*1+[1]*3)\")"
            )
        out.append(str(item))
    for flag, why in SWEEP_ARGS.items():
        if flag in out:
            raise SweepError(f"{where}: remove {flag}: {why}")
    return out


def _last_value(args: list[str], flag: str) -> str | None:
    """The value the last ``flag VALUE`` / ``flag=VALUE`` in ``args`` gives, as argparse sees it."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _name_mapping(raw: dict, key: str) -> dict:
    if not isinstance(raw.get(key), dict):
        raise SweepError(f"'{key}' must be {KEYS[key]}; got {type(raw.get(key)).__name__}")
    if not raw[key]:
        hint = (
            "budgets: {default: []} trains for the recipe's own --train-iters"
            if (key == "budgets")
            else "sizes: {s1: [--num-layers, 2, --hidden-size, 32]}"
        )
        raise SweepError(f"'{key}' is empty: the grid needs at least one, e.g. {hint}")
    for name in raw[key]:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise SweepError(
                f"{key}: name {name!r} may hold only letters, digits, '_' and '.' (it becomes "
                f"part of the run names SIZE-BUDGET-VARIANT): rename it"
            )
    return raw[key]


def load_grid(path: str | Path, out_dir: str | Path | None = None) -> Grid:
    """Reads and validates a grid file.

    Args:
        path: the YAML file.
        out_dir: overrides the file's ``out_dir`` (relative to the current directory).

    Returns:
        the grid.

    Raises:
        SweepError: naming the file, the key at fault and what to change.
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except OSError as error:
        raise SweepError(f"cannot read the grid file: {error}") from None
    except yaml.YAMLError as error:
        raise SweepError(f"{path} is not valid YAML: {error}") from None
    except SweepError as error:
        raise SweepError(f"{path}: {error}") from None
    try:
        return _parse_grid(raw, path, out_dir)
    except SweepError as error:
        raise SweepError(f"{path}: {error}") from None


def _parse_variants(raw: dict) -> tuple[list[str], str | None]:
    """(variants, baseline) of the grid."""
    variants = raw["variants"]
    if isinstance(variants, str):
        variants = [variants]
    if not isinstance(variants, list) or not variants:
        raise SweepError("'variants' must be a non-empty list, e.g. [residual, mhc]")
    for i, variant in enumerate(variants):
        if variant not in VARIANTS:
            raise SweepError(
                f"variants[{i}] = {variant!r} is not a variant; use {', '.join(VARIANTS)}"
            )
        if variant in variants[:i]:
            raise SweepError(f"variant {variant!r} is listed twice in 'variants': remove one")
    baseline = raw.get("baseline", "residual" if "residual" in variants else None)
    if baseline is not None and baseline not in variants:
        raise SweepError(
            f"baseline {baseline!r} is not among the variants {variants}: add it to 'variants' "
            f"or choose one of them"
        )
    return variants, baseline


def _parse_sizes(raw: dict) -> dict[str, tuple[str, list[str]]]:
    """``{size: (recipe, args)}`` of the grid."""
    default_recipe = raw.get("recipe")
    if default_recipe is not None:
        default_recipe = _check_recipe(default_recipe, "recipe")
    sizes = {}
    for name, value in _name_mapping(raw, "sizes").items():
        recipe, args = default_recipe, value
        if isinstance(value, dict):
            unknown = set(value) - {"recipe", "args"}
            if unknown:
                raise SweepError(
                    f"sizes.{name}: unknown key(s) {sorted(unknown)}; a size is a list of "
                    f"arguments or a mapping with 'recipe' and 'args'"
                )
            recipe = _check_recipe(value.get("recipe", default_recipe), f"sizes.{name}.recipe")
            args = value.get("args")
        if recipe is None:
            raise SweepError(
                f"sizes.{name}: no recipe: add a top-level 'recipe: tiny' (or 3b, 9b, 27b), or "
                f"give this size one as {{recipe: 3b, args: [...]}}"
            )
        sizes[name] = (recipe, _arg_list(args, f"sizes.{name}"))
    return sizes


def _parse_env(raw: dict) -> dict[str, str]:
    env = raw.get("env") or {}
    if not isinstance(env, dict):
        raise SweepError(f"'env' must be {KEYS['env']}, e.g. {{NPROC_PER_NODE: 1}}")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME_RE.match(key):
            raise SweepError(f"env: {key!r} is not an environment variable name")
        if key in SWEEP_ENV:
            raise SweepError(
                f"env.{key} is set by the sweep for each run: remove it ({SWEEP_ENV[key]})"
            )
        if isinstance(value, dict | list) or value is None:
            raise SweepError(f"env.{key} must be a string or a number")
    return {k: str(v) for k, v in env.items()}


def _parse_slurm(raw: dict) -> dict[str, str]:
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise SweepError(f"'slurm' must be {KEYS['slurm']}")
    for key, value in slurm.items():
        if key in ("array", "output"):
            raise SweepError(
                f"slurm.{key}: the sweep sets --{key} itself: remove it (sbatch --array=... on "
                f"the command line still overrides it)"
            )
        if isinstance(value, dict | list) or value is None:
            raise SweepError(f"slurm.{key} must be a string or a number (--{key}=VALUE)")
    return {str(k): str(v) for k, v in slurm.items()}


def _parse_grid(raw: object, path: Path, out_dir: str | Path | None) -> Grid:
    if not isinstance(raw, dict):
        raise SweepError(f"the grid must be a mapping with keys {', '.join(KEYS)}")
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SweepError(
                f"unknown key {key!r}{hint}; the keys are: "
                + "; ".join(f"{k}: {v}" for k, v in KEYS.items())
            )
    for key in REQUIRED:
        if key not in raw:
            raise SweepError(f"missing key '{key}': add {KEYS[key]}")

    variants, baseline = _parse_variants(raw)
    sizes = _parse_sizes(raw)
    budgets = {
        name: _arg_list(value, f"budgets.{name}")
        for name, value in _name_mapping(raw, "budgets").items()
    }
    common = _arg_list(raw.get("args"), "args")
    for size, (_, size_args) in sizes.items():
        for budget, budget_args in budgets.items():
            eval_iters = _last_value([*common, *size_args, *budget_args], "--eval-iters")
            if eval_iters is not None and eval_iters.strip() == "0":
                raise SweepError(
                    f"size {size}, budget {budget}: --eval-iters 0 leaves no final validation "
                    f"loss to fit: remove it or give a positive number"
                )
    env = _parse_env(raw)
    cpu = raw.get("cpu", False)
    if not isinstance(cpu, bool):
        raise SweepError(f"'cpu' must be true or false, not {cpu!r}")
    slurm = _parse_slurm(raw)

    if out_dir is not None:
        out = Path(out_dir).resolve()
    else:
        out = ROOT / str(raw.get("out_dir") or f"runs/scaling-{path.stem}")
    if "\t" in str(out) or "\n" in str(out):
        raise SweepError(f"out_dir {str(out)!r} holds a tab or newline: choose another")
    return Grid(
        path=path.resolve(),
        out_dir=out,
        variants=variants,
        baseline=baseline,
        sizes=sizes,
        budgets=budgets,
        args=common,
        env=env,
        cpu=cpu,
        slurm=slurm,
    )
