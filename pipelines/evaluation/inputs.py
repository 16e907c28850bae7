"""What an evaluation reads, checked: sampling-config lists, reference pairs, and samples files.

* **Sampling-config lists** (``experiments/sampling/*.yaml``): a YAML list of operating points. Keys are
  ELF Lab's ``sample.*`` names (``sampler, steps, gamma, sc_cfg, cfg, grid, num_samples, batch_size,
  seed``) or the official names (``sampling_method, num_sampling_steps, sde_gamma,
  self_cond_cfg_scales, cfgs, time_schedule``; pt:configs/config.py:5-24 — missing ``sde_gamma`` is
  0.0 there). A list value expands into one config per value (the official iterates the product of
  steps × cfgs × SC-CFG scales, pt:generation.py:132-134).
* **Reference pairs** for translation / summarisation: raw ``input`` / ``target`` strings (the targets
  are the BLEU/ROUGE references, reference §4.5) from a JSONL file, a ``save_to_disk`` directory or a
  hub dataset; aliases ``wmt14-de-en`` and ``xsum`` name the official validation sets.
* **Samples files**: the official ``{"id", "generated"}`` JSONL (``generated`` falling back to ``text``,
  as scripts/eval_ppl.py:40), plus ``input`` / ``target`` when conditional.

Every error names the file (and line, entry or key) at fault.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from elf_core.config import SampleConfig
from elf_core.errors import ElfError
from elf_core.validation import check_values


class EvalError(ElfError):
    """An evaluation input that cannot be used; the message names what is wrong and where."""


REFERENCE_ALIASES = {
    "wmt14-de-en": "embedded-language-flows/wmt14_de-en_validation_t5",
    "xsum": "embedded-language-flows/xsum_validation_t5",
}
_OFFICIAL_KEYS = {"sampling_method": "sampler", "num_sampling_steps": "steps", "sde_gamma": "gamma",
                  "self_cond_cfg_scales": "sc_cfg", "cfgs": "cfg", "time_schedule": "grid"}
_SAMPLE_KEYS = [f.name for f in dataclasses.fields(SampleConfig)]


# ----------------------------------------------------------------------------------------------
# Sampling configs
def sampler_settings(s: SampleConfig) -> dict[str, str]:
    """The settings that decide the samples, as strings (MLflow params / provenance)."""
    return {"sampler": s.sampler, "steps": str(s.steps), "gamma": str(s.gamma if s.sampler == "sde" else 0.0),
            "sc_cfg": str(s.sc_cfg), "cfg": str(s.cfg), "grid": s.grid, "batch_size": str(s.batch_size)}


def run_name(s: SampleConfig, conditional: bool) -> str:
    """The official output/run naming scheme (pt:utils/generation_utils.py:133-138), numbers always
    printed as floats (the official prints them as typed in its YAML: ``cfg1``/``sccfg3`` from ints),
    e.g. ``sde-steps32-cfg1.0-sccfg3.0-ts_logit_normal-gamma1.5-uncond``."""
    sc = f"-sccfg{float(s.sc_cfg)}" if s.sc_cfg != 1.0 else ""
    gamma = f"-gamma{float(s.gamma)}" if s.sampler == "sde" else ""
    return f"{s.sampler}-steps{s.steps}-cfg{float(s.cfg)}{sc}-ts_{s.grid}{gamma}-{'cond' if conditional else 'uncond'}"


def _coerce(key: str, value: Any, where: str) -> Any:
    target = {f.name: f.type for f in dataclasses.fields(SampleConfig)}[key]
    kind = {"str": str, "int": int, "float": float}.get(str(target).replace("typing.", ""), str)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise EvalError(f"{where}: '{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise EvalError(f"{where}: '{key}' must be a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise EvalError(f"{where}: '{key}' must be a string, got {value!r}")
    return kind(value)


def expand_entry(entry: Any, base: SampleConfig, where: str) -> list[SampleConfig]:
    """One list entry -> the SampleConfigs it stands for (list values expand as a product)."""
    if not isinstance(entry, dict):
        raise EvalError(f"{where}: expected a mapping of sampling settings, got {type(entry).__name__}")
    official = [k for k in entry if k in _OFFICIAL_KEYS]
    ours = [k for k in entry if k not in _OFFICIAL_KEYS]
    if official and ours:
        raise EvalError(f"{where}: mixes official keys {official} with ELF Lab keys {ours}; use one style")
    values: dict[str, Any] = {}
    if official:
        values["gamma"] = 0.0  # the official SamplingConfig default (pt:configs/config.py:24)
    for key, value in entry.items():
        name = _OFFICIAL_KEYS.get(key, key)
        if name not in _SAMPLE_KEYS:
            close = difflib.get_close_matches(key, _SAMPLE_KEYS + list(_OFFICIAL_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise EvalError(f"{where}: unknown sampling key '{key}'{hint}; known: {_SAMPLE_KEYS}")
        values[name] = value
    keys = list(values)
    grids = []
    for k in keys:
        v = values[k]
        if isinstance(v, (list, tuple)):
            if not v:
                raise EvalError(f"{where}: '{k}' is an empty list")
            grids.append([_coerce(k, x, where) for x in v])
        else:
            grids.append([_coerce(k, v, where)])
    out = [dataclasses.replace(base, **dict(zip(keys, combo))) for combo in itertools.product(*grids)]
    for sc in out:  # every value within the range declared next to its SampleConfig field
        check_values(sc, where, EvalError, prefix="sample.")
    return out


def load_sampling_configs(path: str | Path, base: Optional[SampleConfig] = None) -> list[SampleConfig]:
    """The operating points listed in a YAML file, on top of ``base`` (default: SampleConfig())."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise EvalError(f"sampling config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise EvalError(f"{p}: not valid YAML: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise EvalError(f"{p}: expected a non-empty YAML list of sampling configs")
    out: list[SampleConfig] = []
    for i, entry in enumerate(data):
        out.extend(expand_entry(entry, base or SampleConfig(), f"{p}: entry {i + 1}"))
    return out


def apply_overrides(s: SampleConfig, overrides: Sequence[str]) -> SampleConfig:
    """``sample.steps=64`` (or ``steps=64``) dot-list overrides; values parsed as YAML scalars."""
    import yaml

    values = {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise EvalError(f"override '{item}': expected key=value, e.g. sample.steps=64")
        key = key.strip()
        key = key[len("sample."):] if key.startswith("sample.") else key
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            values[key] = raw
    return expand_entry(values, s, "overrides")[0] if values else s


# ----------------------------------------------------------------------------------------------
# Reference pairs
@dataclass
class ReferencePairs:
    """Raw condition / reference strings, optionally with the dataset's pre-tokenised condition ids."""

    inputs: list[str]
    targets: list[str]
    source: str
    ids: Optional[list[list[int]]] = None  # condition_input_ids as stored (official data: T5 ids + EOS)

    def __len__(self) -> int:
        return len(self.targets)

    def ids_origin(self, encoder) -> str:
        return "dataset" if self.ids is not None and encoder.is_t5 else "tokenised"

    def condition_ids(self, encoder, n: int) -> list[list[int]]:
        """Condition ids for the first ``n`` rows: the stored ids when the encoder is T5 (the official
        data's vocabulary), else the input text tokenised as elf_core.data does (no specials + EOS)."""
        if self.ids is not None and encoder.is_t5:
            return [list(x) for x in self.ids[:n]]
        toks = encoder.tokenizer(self.inputs[:n], add_special_tokens=False, verbose=False)["input_ids"]
        return [list(t) + [encoder.eos_id] for t in toks]


def _pick(columns: Sequence[str], wanted: str, fallbacks: Sequence[str]) -> Optional[str]:
    for c in (wanted, *fallbacks):
        if c in columns:
            return c
    return None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                    "expected one JSON object per line (JSONL)") from None
                if not isinstance(obj, dict):
                    raise EvalError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                rows.append((lineno, obj))
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason}); expected JSONL") from None
    except OSError as e:
        raise EvalError(f"{path}: cannot read: {e}") from None
    if not rows:
        raise EvalError(f"{path}: no rows (empty file)")
    return rows


def _string_field(path: Path, lineno: int, obj: dict, names: Sequence[str]) -> str:
    for name in names:
        if name in obj:
            if not isinstance(obj[name], str):
                raise EvalError(f"{path}:{lineno}: field '{name}' must be a string, got {type(obj[name]).__name__}")
            return obj[name]
    raise EvalError(f"{path}:{lineno}: missing field {' / '.join(repr(n) for n in names)} (has: {sorted(obj)})")


def load_reference_pairs(spec: str, *, split: str = "validation", input_field: str = "input",
                         target_field: str = "target", need_inputs: bool = True) -> ReferencePairs:
    """Pairs from ``spec``: a ``.jsonl`` of ``{"input", "target"}``, a ``save_to_disk`` directory, a hub
    dataset (``name`` or ``name:config``), or an alias in :data:`REFERENCE_ALIASES`. Raw hub datasets
    are mapped: WMT's ``translation`` dicts (de → en), XSum's ``document`` / ``summary``."""
    from elf_core.data_sources import DataError, load_hf_dataset, resolve_source

    resolved = REFERENCE_ALIASES.get(spec, spec)
    path = Path(resolved).expanduser()
    if path.is_file() and path.name.endswith(".jsonl"):
        rows = _read_jsonl(path)
        # "output": the key the official eval reads from .jsonl pairs (pt:eval.py:110-113)
        targets = [_string_field(path, ln, o, (target_field, "target", "output")) for ln, o in rows]
        inputs = [_string_field(path, ln, o, (input_field, "input")) if need_inputs else "" for ln, o in rows]
        ids = [o["condition_input_ids"] for _, o in rows] if all("condition_input_ids" in o for _, o in rows) else None
        return ReferencePairs(inputs, targets, str(path.resolve()), ids)
    try:
        src = resolve_source(resolved)
        if src.kind == "file":
            raise EvalError(f"references '{spec}': expected a .jsonl of {{\"input\", \"target\"}}, a save_to_disk "
                            "directory or a hub dataset")
        ds = load_hf_dataset(src, split)
    except DataError as e:
        shared = Path(__file__).resolve().parents[3] / "shared" / "data" / "wmt14_de-en_validation_t5"
        hint = f" (offline, the WMT14 De-En validation set is at {shared})" if shared.is_dir() else ""
        raise EvalError(f"references '{spec}': {e}{hint}") from None
    cols = ds.column_names
    where = f"references '{spec}' ({resolved}, split {split})"
    if "translation" in cols and _pick(cols, input_field, ("input",)) is None:
        pairs = ds["translation"]
        langs = sorted(pairs[0]) if pairs else []
        src_lang, tgt_lang = ("de", "en") if set(langs) >= {"de", "en"} else (langs[0], langs[-1])
        return ReferencePairs([p[src_lang] for p in pairs], [p[tgt_lang] for p in pairs],
                              f"{resolved} ({split}, translation {src_lang}->{tgt_lang})")
    icol = _pick(cols, input_field, ("input", "document", "source"))
    tcol = _pick(cols, target_field, ("target", "summary", "reference"))
    if tcol is None or (need_inputs and icol is None):
        raise EvalError(f"{where}: needs input/target text columns ('{input_field}'/'{target_field}', or "
                        f"document/summary, or translation); has {cols}")
    ids = ds["condition_input_ids"] if "condition_input_ids" in cols else None
    inputs = ds[icol] if icol is not None else [""] * len(ds)
    return ReferencePairs(list(inputs), list(ds[tcol]), f"{resolved} ({split}; {icol}->{tcol})",
                          [list(x) for x in ids] if ids is not None else None)


# ----------------------------------------------------------------------------------------------
# Samples files
def read_samples(path: str | Path) -> list[dict]:
    """``[{"id", "generated", ...}]`` from a samples JSONL, ordered by ``id`` when every id is an integer.
    ``generated`` falls back to ``text`` (scripts/eval_ppl.py:40); either must be a string."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"samples file not found: {p}")
    rows = _read_jsonl(p)
    out = []
    for i, (lineno, obj) in enumerate(rows):
        text = _string_field(p, lineno, obj, ("generated", "text"))
        out.append({**obj, "id": obj.get("id", i), "generated": text})
    ids = [r["id"] for r in out]
    if all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise EvalError(f"{p}: id {dup} appears more than once")
        out.sort(key=lambda r: r["id"])
    return out


def read_reference_texts(spec: str, split: str = "validation") -> list[str]:
    """Reference strings for ``score``: a ``.txt`` (one per line), a ``.jsonl`` (``target``), or a dataset."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".txt":
        return p.read_text(encoding="utf-8").splitlines()
    return load_reference_pairs(spec, split=split, need_inputs=False).targets


__all__ = ["EvalError", "ReferencePairs", "REFERENCE_ALIASES", "sampler_settings", "run_name", "expand_entry",
           "load_sampling_configs", "apply_overrides", "load_reference_pairs", "read_samples",
           "read_reference_texts"]
