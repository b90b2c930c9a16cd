"""What every benchmark script writes: the run's metadata, and its results table printed and
saved (Markdown, and JSON of the raw figures)."""
import json
import os
import platform
import time

import torch


def run_meta(device="cuda", **extra) -> dict:
    """Device name, library versions and date of this run, plus ``extra`` entries."""
    import triton
    dev = torch.device(device)
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), **extra}


def _write(path, write) -> None:
    """``write(fh)`` into ``path`` (its folder made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        write(fh)


def save_json(path, payload) -> None:
    """``payload`` as indented JSON in ``path``."""
    _write(path, lambda fh: json.dump(payload, fh, indent=1))


def emit(table: str, md_path=None, json_path=None, payload=None) -> None:
    """Prints ``table``; writes it to ``md_path`` and ``payload`` to ``json_path`` when given."""
    print(table, flush=True)
    if json_path:
        save_json(json_path, payload)
    if md_path:
        _write(md_path, lambda fh: fh.write(table))
