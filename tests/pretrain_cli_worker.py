"""Imports examples/pretrain_gpt_moe.py as a module (one Megatron import for many checks) and
reports, as JSON on stdout, for tests/test_pretrain.py:

* ``cases``: for each ``[argv, env]`` of the spec, what ``parse_args(argv)`` did under that
  environment (WORLD_SIZE, RANK, ...): its exit status (None when it returned), what it
  printed on stderr, and for a parse that succeeded the resolved output paths;
* ``help``: the ``--help`` text and, per flag, its help entry and choices;
* ``plot``: the lines ``plot()`` draws for a made-up two-part history.

    python tests/pretrain_cli_worker.py SPEC.json      (SPEC: {"cases": [[argv, env], ...]})
"""
import contextlib
import importlib.util
import io
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "examples", "pretrain_gpt_moe.py")


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_case(m, argv, env):
    saved = dict(os.environ)
    os.environ.update(env)
    err = io.StringIO()
    code, paths = None, None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            args = m.parse_args(argv)
        paths = {k: getattr(args, k) for k in ("output_dir", "log_json", "plot",
                                               "tensorboard_dir", "save", "load", "profile",
                                               "lr_decay_iters")}
    except SystemExit as ex:
        code = ex.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"argv": argv, "code": code, "stderr": err.getvalue(), "paths": paths}


def help_entries(m):
    parser = m.build_parser()
    formatter = parser._get_formatter()
    entries = {}
    for action in parser._actions:
        if not action.option_strings or action.help == "show this help message and exit":
            continue
        entries[action.option_strings[0]] = {
            "help": formatter._expand_help(action) if action.help else "",
            "choices": list(action.choices) if action.choices else None}
    return parser.format_help(), entries


def plot_lines(m, path):
    history = {
        "segments": [{"first_iter": 1, "last_iter": 3}, {"first_iter": 4, "last_iter": 6}],
        "iterations": [{"iter": i, "loss": 6.0 - 0.1 * i, "lr": 1e-3, "grad_norm": 1.0}
                       for i in range(1, 7)],
        "log": [{"iter": 3, "loss": 5.8}, {"iter": 6, "loss": 5.5}]}
    fig = m.plot(history, path, True)
    lines = [{"label": ln.get_label(), "x": [float(v) for v in ln.get_xdata()],
              "y": [float(v) for v in ln.get_ydata()]} for ln in fig.axes[0].get_lines()]
    return {"lines": lines, "written": os.path.getsize(path) > 0}


def main():
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    m = load_script()
    m._REPORT_WAIT_S = 0  # a non-reporting process's wait for the reporting one
    text, entries = help_entries(m)
    out = {"cases": [run_case(m, argv, env) for argv, env in spec["cases"]],
           "help": text, "entries": entries,
           "plot": plot_lines(m, spec["plot"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
