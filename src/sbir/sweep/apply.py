"""Override files (``best_params.yaml``, ``best_overrides.txt``) read and merged into a params file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from sbir.config import load_params, read_yaml
from sbir.sweep.spec import SweepError, repo_path


def read_override_file(path: str | os.PathLike) -> dict[str, Any]:
    """Dotted key -> value from ``best_params.yaml`` (nested) or ``best_overrides.txt`` (``-S key=value`` lines)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: override file not found")
    if path.suffix in (".yaml", ".yml"):
        data = read_yaml(path)

        def walk(node: Any, prefix: str) -> dict[str, Any]:
            if isinstance(node, dict):
                return {k2: v2 for k, v in node.items() for k2, v2 in walk(v, f"{prefix}{k}.").items()}
            return {prefix[:-1]: node}

        return walk(data, "")
    out: dict[str, Any] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for flag in ("-S ", "--set-param ", "--set "):
            if line.startswith(flag):
                line = line[len(flag):].strip()
                break
        if "=" not in line:
            raise SweepError(f"{path}:{n}: expected '-S key=value', got {line!r}")
        key, value = line.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SweepError(f"{path}:{n}: value of {key.strip()!r} is not valid YAML ({exc})") from None
    return out


def apply_overrides(override_file: str | os.PathLike, params_path: str | os.PathLike = "params.yaml",
                    dry_run: bool = False) -> dict[str, tuple[Any, Any]]:
    """Merge an override file into a params file, keeping its comments and layout (ruamel.yaml round trip).

    The merged params are validated first (nothing is written when they are invalid). Returns
    ``{key: (old, new)}`` of the keys that change.
    """
    from ruamel.yaml import YAML

    params_path = repo_path(params_path)
    overrides = read_override_file(override_file)
    load_params(params_path, overrides)  # raises ParamsError naming the file and key
    ryaml = YAML()  # round trip: comments and key order stay
    ryaml.preserve_quotes = True
    ryaml.width = 4096
    with params_path.open() as f:
        doc = ryaml.load(f)
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in overrides.items():
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node:
                node[part] = {}
            node = node[part]
        old = node.get(parts[-1]) if hasattr(node, "get") else None
        if old != value:
            changes[key] = (old, value)
            node[parts[-1]] = value
    if changes and not dry_run:
        tmp = params_path.with_name(params_path.name + ".tmp")
        with tmp.open("w") as f:
            ryaml.dump(doc, f)
        load_params(tmp)  # what we wrote must still validate
        os.replace(tmp, params_path)
    return changes
