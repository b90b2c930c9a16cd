r"""Pretrain a Megatron-Core GPT-MoE model with torchrun; --moe-use-plugin runs every MoE layer
with moe_plugin's fused kernels, without it the model is stock Megatron-Core.

  # tiny default, CPU (gloo, Triton interpreter), 2 processes, about 3 minutes on 2 cores
  torchrun --nproc_per_node=2 examples/pretrain_gpt_moe.py --moe-use-plugin

  # on GPUs (NCCL, bf16); expert parallelism over 2 GPUs
  torchrun --nproc_per_node=2 examples/pretrain_gpt_moe.py --moe-use-plugin \
      --num-layers 12 --hidden-size 1024 --num-attention-heads 16 --num-experts 8 \
      --moe-ffn-hidden-size 1536 --seq-length 1024 --micro-batch-size 8 \
      --global-batch-size 16 --expert-model-parallel-size 2 --train-iters 200

  # one GPU, the fastest settings: each micro-batch's forward + backward replayed as one
  # CUDA graph, and moe_plugin's cross entropy (86.8k tokens/s for the 24-layer model of
  # docs/megatron.md on an H100, measured before the script used Megatron's distributed
  # optimizer, with a fused torch AdamW: not re-measured since)
  torchrun --nproc_per_node=1 examples/pretrain_gpt_moe.py --moe-use-plugin --cuda-graph \
      --cross-entropy triton ...

Outputs go to --output-dir (default out/pretrain_gpt_moe, git-ignored): the JSON log
(train_log.json), the loss curve (loss_curve.png) and, when asked for with a bare flag,
TensorBoard events (--tensorboard-dir), checkpoints (--save / --load) and the profile
(--profile). A path given to one of those flags is used as given.

Logs: a progress bar on a terminal (tqdm; plain lines when stdout is not one), and every
--log-interval iterations one line with the interval's averages: LM loss, the MoE aux losses
(Megatron's tracker), gradient norm; then the learning rate of the interval's last iteration,
tokens/s, model TFLOP/s (per GPU on CUDA, per process on a CPU; formula in
model_flops_per_token) and rank 0's peak memory (CUDA: allocated by torch; CPU: the process's
peak RSS). The JSON log holds every iteration's loss, learning rate and gradient norm, the
interval rows, and each layer's expert balance (tokens of the busiest expert / the mean over
experts); the plot draws every iteration with the interval averages over it.

Training uses Megatron's distributed optimizer (fp32 main parameters and Adam state sharded
over the data-parallel ranks; bf16 parameters on GPUs) and OptimizerParamScheduler: linear
warm-up over --lr-warmup-iters, cosine decay to --min-lr at --lr-decay-iters (default
--train-iters).

Data: Megatron's mock dataset by default (MockGPTDataset, no files needed); --data-path PREFIX
trains on a Megatron indexed dataset (PREFIX.bin / PREFIX.idx).

Checkpoints (moe_plugin.megatron.checkpoint: dist_checkpointing of the model, the distributed
optimizer's state in its fully_reshardable format and the scheduler, plus the iteration, the
samples consumed and the run's log history; Megatron-LM's iter_NNNNNNN/ and
latest_checkpointed_iteration.txt layout) move between stock and --moe-use-plugin runs and
between --expert-model-parallel-size values. A resumed run continues exactly when its
--lr-decay-iters is the checkpointed run's: give the final length with --lr-decay-iters to
train in several parts (the schedule is this run's, and --lr-decay-iters defaults to this
run's --train-iters). Its JSON log and plot continue the checkpointed run's history:

  torchrun --nproc_per_node=2 examples/pretrain_gpt_moe.py --train-iters 10 \
      --lr-decay-iters 20 --save
  torchrun --nproc_per_node=2 examples/pretrain_gpt_moe.py --moe-use-plugin \
      --expert-model-parallel-size 2 --train-iters 20 --lr-decay-iters 20 --load --save

Known-harmless warnings of Megatron-Core and torch (TransformerEngine / Apex missing,
deprecations, mock-data index caching) are hidden; --verbose shows them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import resource
import sys
import time
import warnings

SCRIPT = os.path.basename(__file__)
DEFAULT_OUTPUT_DIR = os.path.join("out", "pretrain_gpt_moe")


def reports() -> bool:
    """Whether this process prints command-line help and errors: the first process of each
    node under torchrun (LOCAL_RANK 0: each node's torchrun shows its own output), or a
    process started without torchrun."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


# ------------------------------------------------------------------------------------------
# known-harmless messages of Megatron-Core and torch on the runs this script makes: hidden
# unless --verbose (installed before megatron is imported: some are import-time warnings)

_KNOWN_WARNINGS = (  # (category, message regex, module regex)
    (UserWarning, r"Transformer Engine and Apex are not installed", ""),
    (UserWarning, r"Apex is not installed", ""),
    (UserWarning, r"full scope is deprecated", ""),  # TransformerConfig's own default
    (UserWarning, r"MimoModelConfig is experimental", ""),  # megatron-core 0.19, on import
    # the distributed optimizer's fp32 shards are views of the parameters (megatron-core)
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf", r"megatron\.core"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` "
                    r"is deprecated", ""),  # called by megatron-core
)
_KNOWN_LOG_RECORDS = {  # logger: message prefixes
    # the plugin's spec entry is not one of the MLP classes Megatron lists (0.16)
    "megatron.core.transformer.transformer_layer": ("Unknown MLP type",),
    "megatron.core.datasets.gpt_dataset": ("Unable to save MockGPTDataset indexes",),
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),  # 0.19
    "megatron.core.distributed.distributed_data_parallel": (
        "DistributedDataParallel: full_param_layout not provided",),  # 0.19
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),  # a CPU machine
    # 0.19's default save strategy says so on every save, synchronous ones too
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
}


class _DropKnown(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def hide_known_messages() -> None:
    for category, message, module in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefixes in _KNOWN_LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_DropKnown(prefixes))


if "--verbose" not in sys.argv[1:]:
    hide_known_messages()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # moe_plugin's kernels on the CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_plugin import patches  # noqa: E402  (megatron-core fixes, CPU shims: its README.md)

patches.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import \
    BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset  # noqa
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402

from moe_plugin.megatron import (MoEPluginConfig, PluginMoELayer, add_plugin_args,  # noqa
                                 gpt_decoder_block_spec, plugin_options)
from moe_plugin.megatron import compat  # noqa: E402  (the aux-loss tracker of either version)
from moe_plugin.graphs import GraphedStep, side_stream  # noqa: E402
from moe_plugin.megatron.attention import with_sdpa_attention  # noqa: E402
from moe_plugin.megatron.checkpoint import (checkpoint_dir_for, latest_iteration,  # noqa
                                            load_checkpoint, save_checkpoint)
from moe_plugin.megatron.loss import use_fused_cross_entropy  # noqa: E402
from moe_plugin.quant import cache_quantized_weights  # noqa: E402

try:  # the progress bar (the `megatron` extra installs tqdm); plain lines without it
    from tqdm import tqdm
except ImportError:  # pragma: no cover - GPU machines may lack it
    tqdm = None


# ------------------------------------------------------------------------------------------
# command line

class ArgumentError(Exception):
    """A bad command line: the message names the flag."""


_REPORT_WAIT_S = 10  # how long a non-reporting process gives the reporting one (``fail``)


def fail(message: str) -> None:
    """Prints ``SCRIPT: error: message`` once (see ``reports``), hands it to torchrun as this
    worker's error (its failure summary then shows it as the root cause) and exits with status
    2. The other processes check the same command line: they exit with status 2 too, silently,
    after giving the reporting one time to report (torchrun ends them once it has exited)."""
    if not reports():
        time.sleep(_REPORT_WAIT_S)
        sys.exit(2)
    text = f"{SCRIPT}: error: {message}"
    print(text, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchelastic's error-file format (errors/error_handler.py)
        with contextlib.suppress(OSError):
            with open(error_file, "w") as fh:
                json.dump({"message": {"message": text, "extraInfo": {
                    "py_callstack": text, "timestamp": str(int(time.time()))}}}, fh)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    """argparse, with its messages (help, errors) printed once (``reports``) and errors
    through ``fail``."""

    def _print_message(self, message, file=None):
        if reports():
            super()._print_message(message, file)

    def error(self, message):
        fail(f"{message} (see --help)")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written; each flag's default after its help (on/off for switches;
    flags whose default is derived say so in their help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # a switch: on when its default is the value it stores
            return f"{text} (default: {'on' if action.default == action.const else 'off'})"
        return f"{text} (default: %(default)s)"


class InOutputDir(str):
    """A flag's value when given without one: ``name`` inside ``--output-dir``."""

    def __new__(cls, name):
        return super().__new__(cls, os.path.join("OUTPUT_DIR", name))


def _int_at_least(low: int):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _float_at_least(low: float):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number >= {low:g}, got {text!r}")
        if not value >= low or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a finite number >= {low:g}, got "
                                             f"{text!r}")
        return value
    parse.__name__ = f"number >= {low:g}"
    return parse


POSITIVE, NONNEG, NONNEG_FLOAT = _int_at_least(1), _int_at_least(0), _float_at_least(0.0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=_HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=POSITIVE, default=2, metavar="N",
                   help="transformer layers")
    g.add_argument("--hidden-size", type=POSITIVE, default=64, metavar="H",
                   help="model width")
    g.add_argument("--num-attention-heads", type=POSITIVE, default=4, metavar="N",
                   help="attention heads")
    g.add_argument("--ffn-hidden-size", type=POSITIVE, default=None, metavar="F",
                   help="FFN size of the dense layers (default: 4 x --hidden-size)")
    g.add_argument("--num-experts", type=POSITIVE, default=4, metavar="E",
                   help="routed experts per MoE layer")
    g.add_argument("--moe-ffn-hidden-size", type=POSITIVE, default=64, metavar="F",
                   help="FFN size of each routed expert")
    g.add_argument("--moe-router-topk", type=POSITIVE, default=2, metavar="K",
                   help="experts per token (at most --num-experts)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=POSITIVE, default=None,
                   metavar="F", help="FFN size of a shared expert (default: none)")
    g.add_argument("--moe-layer-freq", type=POSITIVE, default=1, metavar="N",
                   help="every N-th layer is MoE, the others dense (1: all)")
    g.add_argument("--first-dense-layers", type=NONNEG, default=0, metavar="N",
                   help="make the first N layers dense")
    g.add_argument("--moe-aux-loss-coeff", type=NONNEG_FLOAT, default=1e-2, metavar="C",
                   help="load-balancing loss coefficient")
    g.add_argument("--moe-z-loss-coeff", type=NONNEG_FLOAT, default=1e-3, metavar="C",
                   help="router z-loss coefficient")
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"],
                   default="softmax", help="router scores")
    g.add_argument("--vocab-size", type=_int_at_least(2), default=256, metavar="V",
                   help="vocabulary size (mock data: token ids below it)")
    g.add_argument("--seq-length", type=POSITIVE, default=32, metavar="S",
                   help="tokens per sample")
    g = p.add_argument_group("parallelism and batch")
    g.add_argument("--expert-model-parallel-size", type=POSITIVE, default=1, metavar="P",
                   help="ranks the experts are split over (divides the number of processes "
                        "and --num-experts); the other parallel sizes are 1, so the "
                        "data-parallel size is the number of processes")
    g.add_argument("--micro-batch-size", type=POSITIVE, default=1, metavar="B",
                   help="samples per forward on one rank")
    g.add_argument("--global-batch-size", type=POSITIVE, default=2, metavar="B",
                   help="samples per iteration over all ranks (a multiple of "
                        "--micro-batch-size x the number of processes)")
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=POSITIVE, default=30, metavar="N",
                   help="train up to this iteration (from the checkpoint's, with --load)")
    g.add_argument("--lr", type=NONNEG_FLOAT, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=NONNEG_FLOAT, default=3e-4,
                   help="learning rate at the end of the decay (at most --lr)")
    g.add_argument("--lr-warmup-iters", type=NONNEG, default=3, metavar="N",
                   help="linear warm-up from 0 over N iterations (Megatron's "
                        "OptimizerParamScheduler), then cosine decay")
    g.add_argument("--lr-decay-iters", type=POSITIVE, default=None, metavar="N",
                   help="the cosine decay reaches --min-lr at iteration N (Megatron-LM's "
                        "flag; default: --train-iters). A resumed run continues exactly "
                        "only with the checkpointed run's value: to train in parts, give "
                        "every part the final length here")
    g.add_argument("--weight-decay", type=NONNEG_FLOAT, default=0.01, help="AdamW weight decay")
    g.add_argument("--clip-grad", type=NONNEG_FLOAT, default=1.0,
                   help="clip the global gradient norm to this (0: no clipping; at EP 1 "
                        "Megatron's optimizer then computes no norm and 0 is logged)")
    g.add_argument("--seed", type=int, default=1234, help="initialisation and data seed")
    g.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 parameters, fp32 main copies (default: on with CUDA)")
    g.add_argument("--fp32", dest="bf16", action="store_false",
                   help="fp32 parameters (default: on without CUDA)")
    g.add_argument("--attention", choices=["sdpa", "megatron"], default="sdpa",
                   help="core attention: PyTorch's fused scaled_dot_product_attention "
                        "(moe_plugin.megatron.SDPAttention) or Megatron's unfused "
                        "DotProductAttention (the local spec's); the same for stock and plugin")
    g.add_argument("--cross-entropy", choices=["megatron", "megatron_fused", "triton"],
                   default="megatron",
                   help="the language-model loss: Megatron's vocab_parallel_cross_entropy, "
                        "Megatron's cross_entropy_loss_fusion (native, torch.compile'd), or "
                        "moe_plugin's one-pass Triton kernels (moe_plugin.megatron.loss); the "
                        "same for stock and plugin runs")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay each micro-batch's forward + backward as one CUDA graph "
                        "(moe_plugin.graphs.GraphedStep): removes the host launch overhead "
                        "that bounds small models; needs CUDA, --moe-use-plugin and "
                        "--expert-model-parallel-size 1")
    g = p.add_argument_group("data, outputs, checkpoints, logs")
    g.add_argument("--data-path", default=None, metavar="PREFIX",
                   help="Megatron indexed dataset PREFIX.bin / PREFIX.idx (default: "
                        "Megatron's mock data)")
    g.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help="where the outputs go unless a flag below is given a path")
    g.add_argument("--log-json", default=None, metavar="FILE",
                   help="the JSON log, written by rank 0 at the end and with every "
                        "checkpoint ('': none; default: OUTPUT_DIR/train_log.json)")
    g.add_argument("--plot", default=None, metavar="FILE",
                   help="the loss curve (PNG, needs matplotlib), written by rank 0 at the end "
                        "('': none; default: OUTPUT_DIR/loss_curve.png)")
    g.add_argument("--tensorboard-dir", nargs="?", const=InOutputDir("tensorboard"),
                   default=None, metavar="DIR",
                   help="write TensorBoard events to DIR (bare flag: OUTPUT_DIR/tensorboard): "
                        "every iteration's 'lm loss', 'learning-rate', 'grad-norm'; at each "
                        "log line the interval's 'lm loss (interval average)', aux losses, "
                        "'tokens-per-second' and 'moe/tokens_per_expert_max_over_mean_layer_N' "
                        "(default: off)")
    g.add_argument("--log-interval", type=POSITIVE, default=5, metavar="N",
                   help="a log line every N iterations (and at the last)")
    g.add_argument("--save", nargs="?", const=InOutputDir("checkpoints"), default=None,
                   metavar="DIR",
                   help="write Megatron checkpoints (model, distributed optimizer, scheduler, "
                        "iteration, data position, log history) to DIR/iter_NNNNNNN (bare "
                        "flag: OUTPUT_DIR/checkpoints) (default: none)")
    g.add_argument("--save-interval", type=NONNEG, default=0, metavar="N",
                   help="also save every N iterations (0: only at the end)")
    g.add_argument("--load", nargs="?", const=InOutputDir("checkpoints"), default=None,
                   metavar="DIR",
                   help="resume from DIR's latest checkpoint (DIR/latest_checkpointed_"
                        "iteration.txt; bare flag: OUTPUT_DIR/checkpoints), written by a "
                        "stock or a plugin run at any expert-parallel size (default: none)")
    g.add_argument("--profile", nargs="?", const=InOutputDir("profile.txt"), default=None,
                   metavar="FILE",
                   help="profile two iterations (from --profile-start) with torch.profiler; "
                        "rank 0 writes the per-kernel table to FILE (bare flag: "
                        "OUTPUT_DIR/profile.txt) and prints its top rows (default: off)")
    g.add_argument("--profile-start", type=NONNEG, default=5, metavar="N",
                   help="the first profiled iteration (0-based)")
    g.add_argument("--verbose", action="store_true",
                   help="show the known-harmless warnings of Megatron-Core and torch too")
    add_plugin_args(p)
    return p


# the TransformerConfig fields the flags set, for messages in the flags' names
FLAG_OF_FIELD = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads", "ffn_hidden_size": "--ffn-hidden-size",
    "num_moe_experts": "--num-experts", "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "moe_router_topk": "--moe-router-topk",
    "moe_shared_expert_intermediate_size": "--moe-shared-expert-intermediate-size",
    "moe_layer_freq": "--moe-layer-freq", "moe_aux_loss_coeff": "--moe-aux-loss-coeff",
    "moe_z_loss_coeff": "--moe-z-loss-coeff",
    "moe_router_score_function": "--moe-router-score-function",
    "expert_model_parallel_size": "--expert-model-parallel-size",
    "moe_plugin_quant": "--moe-plugin-quant", "bf16": "--bf16",
}


def in_flag_names(message: str) -> str:
    """A TransformerConfig / plugin message with the fields named by their flags:
    ``TransformerConfig.moe_router_topk=5: expected at most num_moe_experts=4`` ->
    ``--moe-router-topk 5: expected at most --num-experts 4``."""
    fields = "|".join(sorted(FLAG_OF_FIELD, key=len, reverse=True))
    message = re.sub(r"\bTransformerConfig\.", "", message)
    message = re.sub(rf"\b({fields})=", lambda m: FLAG_OF_FIELD[m.group(1)] + " ", message)
    return re.sub(rf"\b({fields})\b", lambda m: FLAG_OF_FIELD[m.group(1)], message)


def parse_args(argv=None):
    """The command line, checked before any process group or Megatron state exists: a bad
    value prints one message naming the flag and exits with status 2 (``fail``)."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ArgumentError as ex:
        fail(str(ex))
    return args


def _in_output_dir(value, output_dir: str, name: str):
    """A path flag's value: ``name`` in the output directory when not given (None), the
    output directory's default for a bare flag, None for '' (off), else as given."""
    if value is None:
        return os.path.join(output_dir, name) if name else None
    if isinstance(value, InOutputDir):
        return os.path.join(output_dir, os.path.basename(value))
    return value or None


def check_args(args) -> None:
    """Fills in derived defaults and checks the flags together; raises ``ArgumentError``."""
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.bf16 is None:
        args.bf16 = cuda
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    out = args.output_dir
    args.log_json = _in_output_dir(args.log_json, out, "train_log.json")
    args.plot = _in_output_dir(args.plot, out, "loss_curve.png")
    for flag in ("tensorboard_dir", "save", "load", "profile"):
        setattr(args, flag, _in_output_dir(getattr(args, flag), out, None))
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr:g}: must be at most --lr {args.lr:g}")
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(
            f"--lr-warmup-iters {args.lr_warmup_iters}: must be smaller than --lr-decay-iters "
            f"{args.lr_decay_iters} (Megatron's scheduler decays after the warm-up; "
            f"--lr-decay-iters defaults to --train-iters)")
    if args.cuda_graph:
        why = ("it needs CUDA" if not cuda else
               "it needs --moe-use-plugin (stock Megatron-Core's MoE layers read token counts "
               "on the host, which graph capture forbids)" if not args.moe_use_plugin else
               "it needs --expert-model-parallel-size 1 (the expert-parallel dispatch sizes "
               "its receive buffers on the host)" if args.expert_model_parallel_size != 1
               else None)
        if why:
            raise ArgumentError(f"--cuda-graph: {why}")
    if args.moe_plugin_quant and not args.moe_use_plugin:
        raise ArgumentError(f"--moe-plugin-quant {args.moe_plugin_quant}: needs "
                            f"--moe-use-plugin (stock Megatron-Core runs its own experts)")
    ep = args.expert_model_parallel_size
    if world % ep:
        raise ArgumentError(f"--expert-model-parallel-size {ep}: must divide the number of "
                            f"processes, {world} (torchrun's --nproc_per_node x nodes)")
    if args.num_experts % ep:
        raise ArgumentError(f"--expert-model-parallel-size {ep}: must divide --num-experts "
                            f"{args.num_experts}")
    per_step = args.micro_batch_size * world  # data-parallel size = world (TP = PP = CP = 1)
    if args.global_batch_size % per_step:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size}: must be a multiple of "
            f"--micro-batch-size {args.micro_batch_size} x {world} processes (data-parallel "
            f"size) = {per_step}")
    if not any(moe_layer_pattern(args)):
        raise ArgumentError(
            f"--first-dense-layers {args.first_dense_layers} / --moe-layer-freq "
            f"{args.moe_layer_freq}: leave no MoE layer among the {args.num_layers} layers")
    if args.profile and args.profile_start >= args.train_iters:
        raise ArgumentError(f"--profile-start {args.profile_start}: the run ends at "
                            f"iteration {args.train_iters}")
    if args.data_path:
        missing = [f"{args.data_path}{ext}" for ext in (".bin", ".idx")
                   if not os.path.isfile(f"{args.data_path}{ext}")]
        if missing:
            raise ArgumentError(f"--data-path {args.data_path}: no {' or '.join(missing)}")
    if args.tensorboard_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as ex:
            raise ArgumentError(f"--tensorboard-dir: needs the tensorboard package (pip "
                                f"install tensorboard): {ex}") from None
    if args.load:
        try:
            it = latest_iteration(args.load)
        except (OSError, ValueError) as ex:
            raise ArgumentError(f"--load {args.load}: {str(ex).partition(': ')[2]}") from None
        if not os.path.isdir(checkpoint_dir_for(args.load, it)):
            raise ArgumentError(f"--load {args.load}: its tracker names iteration {it} but "
                                f"{checkpoint_dir_for(args.load, it)} does not exist")
        if it >= args.train_iters:
            raise ArgumentError(f"--train-iters {args.train_iters}: the checkpoint in --load "
                                f"{args.load} is at iteration {it}, nothing left to train")
    try:  # the model flags through Megatron's TransformerConfig and moe_plugin's own checks
        cfg = model_config(args)
        plugin_options(cfg)  # (a plugin config ran them already; a stock run is held to them
        # too: this script's flags are ones both implementations take)
    except (ValueError, TypeError, AssertionError) as ex:
        raise ArgumentError(in_flag_names(str(ex)) or f"the model flags: Megatron's "
                            f"TransformerConfig refuses them ({type(ex).__name__})") from None


def moe_layer_pattern(args) -> list:
    """Megatron's ``moe_layer_freq`` list: 1 for an MoE layer, 0 for a dense one."""
    return [0 if (i < args.first_dense_layers or i % args.moe_layer_freq) else 1
            for i in range(args.num_layers)]


# ------------------------------------------------------------------------------------------
# model, data, optimizer

def model_config(args) -> MoEPluginConfig:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return MoEPluginConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        num_moe_experts=args.num_experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk, moe_layer_freq=moe_layer_pattern(args),
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_router_score_function=args.moe_router_score_function,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_token_dispatcher_type="alltoall", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        expert_model_parallel_size=args.expert_model_parallel_size,
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=dtype,
        bf16=args.bf16, pipeline_dtype=dtype, moe_use_plugin=args.moe_use_plugin,
        moe_plugin_quant=args.moe_plugin_quant,
        moe_plugin_accumulate_wgrad=args.moe_plugin_accumulate_wgrad,
        cross_entropy_loss_fusion=args.cross_entropy == "megatron_fused",
        cross_entropy_fusion_impl="native")


def model_flops_per_token(cfg, seq: int, vocab: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward): 6 × the parameters a
    token touches (attention projections, the dense or the active experts' FFNs, the output
    layer) + 12 × layers × hidden × seq for the attention scores (causal mask ignored)."""
    h, L = cfg.hidden_size, cfg.num_layers
    attn = 4 * h * h
    freq = cfg.moe_layer_freq
    moe_layers = sum(freq) if isinstance(freq, list) else L
    dense_ffn = 3 * h * cfg.ffn_hidden_size
    active_moe = 3 * h * cfg.moe_ffn_hidden_size * cfg.moe_router_topk + h * cfg.num_moe_experts
    if cfg.moe_shared_expert_intermediate_size:
        active_moe += 3 * h * cfg.moe_shared_expert_intermediate_size
    params = L * attn + (L - moe_layers) * dense_ffn + moe_layers * active_moe + h * vocab
    return 6.0 * params + 12.0 * L * h * seq


def build_data(args, num_samples: int):
    cfg = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length,
        blend=([args.data_path], None) if args.data_path else None,
        split="100,0,0" if args.data_path else None,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, tokenizer=NullTokenizer(args.vocab_size - 1))
    cls = GPTDataset if args.data_path else MockGPTDataset
    train, _, _ = BlendedMegatronDatasetBuilder(cls, [num_samples, 0, 0], lambda: True,
                                                cfg).build()
    return train


def batch_at(data, start: int, count: int, device):
    """The micro-batch of samples ``[start, start + count)``; on CUDA copied from pinned
    memory without waiting (the host does not stall on the GPU's queue)."""
    items = [data[i] for i in range(start, start + count)]
    out = {}
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        t = torch.stack([torch.as_tensor(it[k]) for it in items])
        out[k] = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
    return out


def optimizer_config(args) -> OptimizerConfig:
    """Megatron's distributed optimizer (torch's AdamW underneath without TransformerEngine /
    apex): fp32 main parameters and Adam state, bf16 model parameters with ``--bf16``."""
    return OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, clip_grad=args.clip_grad, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=True)


def lr_scheduler(args, optimizer) -> OptimizerParamScheduler:
    """Linear warm-up over ``--lr-warmup-iters`` (from 0), cosine decay to ``--min-lr`` at
    ``--lr-decay-iters``, constant weight decay; stepped once per iteration. On ``--load`` the
    schedule stays this run's (Megatron-LM's ``--override-opt_param-scheduler``) and the
    checkpoint gives the step count: a resumed run with the checkpointed run's
    ``--lr-decay-iters`` continues its schedule exactly, whatever its ``--train-iters``."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
        lr_decay_style="cosine", start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.lr_decay_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


# ------------------------------------------------------------------------------------------
# measurements

def peak_memory_gib() -> float:
    """This process's peak: CUDA memory allocated by torch, or on a CPU the peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


class ExpertLoads:
    """Tokens routed to each expert of every MoE layer, summed over the iterations since the
    last ``take()`` and over all ranks. Stock layers are counted from their router's routing
    map, moe_plugin's from the layer's ``tokens_per_expert``: the same quantity (each rank's
    own tokens, every expert). Forward hooks add on the device (no host synchronisation; a
    CUDA-graph capture records the additions)."""

    def __init__(self, model, num_experts: int, device):
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.layer_numbers = [m.layer_number for m in layers]
        self.counts = torch.zeros(len(layers), num_experts, dtype=torch.int64, device=device)
        for i, layer in enumerate(layers):
            if isinstance(layer, PluginMoELayer):
                layer.register_forward_hook(self._plugin_hook(i))
            else:  # stock: the router returns (probs, routing_map [tokens, E])
                layer.router.register_forward_hook(self._router_hook(i))

    def _plugin_hook(self, i: int):
        def hook(layer, inputs, output):  # (returns None: the output stays the layer's)
            self.counts[i].add_(layer.last_info["tokens_per_expert"])
        return hook

    def _router_hook(self, i: int):
        def hook(router, inputs, output):
            self.counts[i].add_(output[1].sum(0))
        return hook

    def reset(self) -> None:
        self.counts.zero_()

    def take(self) -> dict:
        """``{layer number: tokens of the busiest expert / mean tokens per expert}`` over all
        ranks since the last call (collective), then resets."""
        counts = self.counts.clone()
        dist.all_reduce(counts)
        self.reset()
        counts = counts.double()
        ratio = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-30)
        return {str(n): float(r) for n, r in zip(self.layer_numbers, ratio.tolist())}


class Output:
    """What rank 0 shows and writes: the progress bar (tqdm on a terminal, else nothing
    between the log lines), log lines, TensorBoard events."""

    def __init__(self, args, start_iter: int, rank: int):
        self.rank = rank
        self.bar = None
        self.writer = None
        if rank != 0:
            return
        if tqdm is not None and sys.stdout.isatty():
            self.bar = tqdm(total=args.train_iters, initial=start_iter, file=sys.stdout,
                            dynamic_ncols=True, unit="it")
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=args.tensorboard_dir)

    def say(self, text: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def iteration(self, rec: dict) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {rec['loss']:.4f}", refresh=False)
            self.bar.update(1)
        if self.writer is not None:
            it = rec["iter"]
            self.writer.add_scalar("lm loss", rec["loss"], it)
            self.writer.add_scalar("learning-rate", rec["lr"], it)
            self.writer.add_scalar("grad-norm", rec["grad_norm"], it)

    def interval(self, row: dict, aux: dict) -> None:
        if self.writer is None:
            return
        it = row["iter"]
        self.writer.add_scalar("lm loss (interval average)", row["loss"], it)
        for name, value in aux.items():
            self.writer.add_scalar(name, value, it)
        self.writer.add_scalar("tokens-per-second", row["tokens_per_s"], it)
        for layer, ratio in row["tokens_per_expert_max_over_mean"].items():
            self.writer.add_scalar(f"moe/tokens_per_expert_max_over_mean_layer_{layer}", ratio,
                                   it)
        self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def log_line(row: dict, aux: dict, cuda: bool) -> str:
    aux_txt = " | ".join(f"{k} {v:.4f}" for k, v in aux.items())
    speed = (f"{row['tflops_per_gpu']:.3g} TFLOP/s per GPU | peak mem {row['peak_mem_gib']:.2f} "
             f"GiB (CUDA allocated, rank 0)" if cuda else
             f"{row['tflops_per_process']:.3g} TFLOP/s per process (CPU) | peak RSS "
             f"{row['peak_rss_gib']:.2f} GiB (rank 0)")
    return (f"iter {row['iter']:5d} | loss {row['loss']:.4f} | {aux_txt} | grad norm "
            f"{row['grad_norm']:.3f} | lr {row['lr']:.3g} | {row['tokens_per_s']:,.0f} "
            f"tokens/s | {speed}")


# ------------------------------------------------------------------------------------------
# the run

def init_distributed(cuda: bool) -> None:
    """torchrun's process group; a plain ``python`` start runs as a one-process group."""
    if "RANK" not in os.environ:
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    init_distributed(cuda)
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = args.expert_model_parallel_size
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_micro = args.global_batch_size // (args.micro_batch_size * dp_size)

    cfg = model_config(args)
    spec = gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    if args.attention == "sdpa":
        spec = with_sdpa_attention(spec)
    model = GPTModel(cfg, spec,
                     vocab_size=args.vocab_size, max_sequence_length=args.seq_length,
                     share_embeddings_and_output_weights=True).to(device)
    if args.cross_entropy == "triton":
        use_fused_cross_entropy(model)
    if args.bf16:  # as Megatron's training loop does: every module (norms included) in bf16,
        model = Float16Module(cfg, model)  # float inputs cast in, the loss cast back to fp32
    # the distributed optimizer: DDP reduce-scatters the gradients into fp32 buffers, each rank
    # updates its shard of fp32 main parameters and the shards are gathered into the model's
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=True)
    # DDP takes each parameter's gradient-accumulator node to hook it; a node records the
    # stream current at its creation and backward accumulates there. Created on the default
    # (legacy) stream, capture fails ("would make the legacy stream depend on a capturing
    # blocking stream"): for --cuda-graph it is built under a side stream (graphs.py)
    with side_stream() if args.cuda_graph else contextlib.nullcontext():
        model = DistributedDataParallel(cfg, ddp_cfg, model)
    opt = get_megatron_optimizer(optimizer_config(args), [model])
    scheduler = lr_scheduler(args, opt)
    loads = ExpertLoads(model, args.num_experts, device)
    cache = None
    if args.moe_use_plugin and cfg.moe_plugin_quant:
        # FP8 experts: quantise each expert weight once per optimizer step (not per
        # micro-batch); the cache is refreshed after every opt.step() (which writes the
        # weights) and after a layer's load_state_dict
        cache = cache_quantized_weights(model, opt)
    start_iter, consumed = 0, 0
    history = {"segments": [], "log": [], "iterations": []}  # the JSON log, over all parts
    loaded = None
    if args.load:
        common = load_checkpoint(args.load, model, opt, scheduler)
        start_iter, consumed = common["iteration"], common["consumed_train_samples"]
        saved = common.get("train_log")
        if saved:  # the checkpointed run's history, up to the checkpoint
            history = {"segments": list(saved["segments"]),
                       "log": [r for r in saved["log"] if r["iter"] <= start_iter],
                       "iterations": [r for r in saved["iterations"] if r["iter"] <= start_iter]}
        if cache is not None:  # the optimizer's load wrote the weights' main copies too
            cache.refresh()
        loaded = (f"loaded {args.load} (iteration {start_iter}, {consumed} samples consumed"
                  f"{'' if saved else '; it holds no log history'})")
    history["segments"].append({
        "first_iter": start_iter + 1, "last_iter": args.train_iters, "load": args.load,
        "moe_use_plugin": args.moe_use_plugin, "expert_model_parallel_size": ep,
        "world_size": world, "device": device.type})
    out = Output(args, start_iter, rank)
    if loaded:
        out.say(loaded)
    data = build_data(args, num_samples=args.train_iters * args.global_batch_size + 1)
    flops_tok = model_flops_per_token(cfg, args.seq_length, args.vocab_size)
    tokens_per_iter = args.global_batch_size * args.seq_length
    n_params = sum(p.numel() for p in model.parameters())
    out.say(f"moe_plugin={'on' if args.moe_use_plugin else 'off (stock Megatron-Core)'}; "
            f"world {world} (EP {ep}, DP {dp_size}); params on rank 0: {n_params / 1e6:.2f}M; "
            f"{num_micro} micro-batches of {args.micro_batch_size} per rank per iteration; "
            f"device {device}; outputs: {args.output_dir}")
    # explicit causal mask (True = masked): Megatron's default mask is built on CUDA only;
    # SDPAttention takes None as causal (the fused kernels' own causal mode)
    causal = None if args.attention == "sdpa" else torch.triu(
        torch.ones(args.seq_length, args.seq_length, dtype=torch.bool, device=device),
        diagonal=1)[None, None]
    # the aux losses' backward scale: one tensor for the whole run (a captured graph reads it)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=device) / num_micro)

    def forward_backward(tokens, position_ids, labels, loss_mask):
        losses = model(tokens, position_ids, causal, labels=labels)
        loss = (losses.float() * loss_mask).sum() / loss_mask.sum()
        (loss / num_micro).backward()
        return loss.detach()

    step = forward_backward
    if args.cuda_graph:
        example = batch_at(data, consumed + dp_rank * args.micro_batch_size,
                           args.micro_batch_size, device)
        step = GraphedStep(forward_backward, example, warmup=2)
        # undo what the eager warm-up runs accumulated
        model.zero_grad_buffer()
        compat.clear_aux_losses()
        loads.reset()
        for mod in model.modules():
            if isinstance(getattr(mod, "local_tokens_per_expert", None), torch.Tensor):
                mod.local_tokens_per_expert.zero_()
    interval = []  # this interval's per-iteration records
    queued = []  # (iteration, lr, grad norm, loss on the host, copy-done event): read later
    t_last, it_last = time.time(), start_iter
    prof = None
    for it in range(start_iter, args.train_iters):
        if args.profile and it == args.profile_start:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else []))
            prof.start()
        if prof is not None and it == args.profile_start + 2:
            finish_profile(prof, args.profile, rank, cuda, out)
            prof = None
        model.train()
        model.zero_grad_buffer()
        opt.zero_grad()
        loss_sum = torch.zeros((), device=device)
        for m in range(num_micro):
            base = consumed + (m * dp_size + dp_rank) * args.micro_batch_size
            b = batch_at(data, base, args.micro_batch_size, device)
            loss_sum += step(**b) / num_micro
        finalize_model_grads([model])  # DP / expert-DP reduction, expert-bias updates
        consumed += args.global_batch_size
        lr = opt.param_groups[0]["lr"]  # what this step uses (the scheduler sets it)
        # gradient clipping and the update of the fp32 main parameters (copied into the
        # model's); returns the gradient norm before clipping (read on the host)
        ok, gnorm, _ = opt.step()
        if not ok:  # only fp16 loss scaling skips steps; this script runs bf16 or fp32
            raise RuntimeError(f"iteration {it + 1}: the optimizer skipped its step")
        scheduler.step(increment=1)
        dist.all_reduce(loss_sum)
        # the loss goes to the host without stalling it: a step's loss is read once the next
        # step is queued (or at a log line), so the host keeps the GPU's queue full
        if cuda:
            host = torch.empty((), dtype=loss_sum.dtype, pin_memory=True)
            host.copy_(loss_sum, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = loss_sum, None
        queued.append((it + 1, lr, 0.0 if gnorm is None else float(gnorm), host, done))
        last = it + 1 == args.train_iters
        log_now = (it + 1) % args.log_interval == 0 or last
        save_now = args.save and (last or args.save_interval
                                  and (it + 1) % args.save_interval == 0)
        ready = queued if log_now or save_now or not cuda else queued[:-1]
        for n, lr_n, gnorm_n, host_n, done_n in ready:
            if done_n is not None:
                done_n.synchronize()
            rec = {"iter": n, "loss": float(host_n) / world, "lr": lr_n, "grad_norm": gnorm_n}
            interval.append(rec)
            history["iterations"].append(rec)
            out.iteration(rec)
        queued = queued[len(ready):]
        if log_now:
            if cuda:
                torch.cuda.synchronize()
            dt = time.time() - t_last
            its = it + 1 - it_last
            t_last, it_last = time.time(), it + 1
            # the tracker sums each layer's loss/coeff over every forward since it was
            # cleared: average over those forwards, then over the MoE layers
            calls = its * num_micro
            aux = {name: float(v.float().sum() / calls / max(1, int((v != 0).sum())))
                   for name, v in compat.reduced_aux_losses().items()}
            compat.clear_aux_losses()
            tok_s = tokens_per_iter * its / dt
            flops = flops_tok * tok_s / world / 1e12
            row = {"iter": it + 1, "loss": sum(r["loss"] for r in interval) / len(interval),
                   "grad_norm": sum(r["grad_norm"] for r in interval) / len(interval),
                   "lr": lr, **aux, "tokens_per_s": tok_s,
                   **({"tflops_per_gpu": flops, "peak_mem_gib": peak_memory_gib()} if cuda
                      else {"tflops_per_process": flops, "peak_rss_gib": peak_memory_gib()}),
                   "tokens_per_expert_max_over_mean": loads.take()}
            interval = []
            history["log"].append(row)
            out.say(log_line(row, aux, cuda))
            out.interval(row, aux)
        if save_now:  # once per iteration: the interval's, or the last
            save(args, model, opt, scheduler, it + 1, consumed, history, out)
            if rank == 0 and args.log_json:
                write_json(args, history, device)
    if prof is not None:  # the run ended inside the profiled window
        finish_profile(prof, args.profile, rank, cuda, out)
    out.close()
    if rank == 0 and args.log_json:
        write_json(args, history, device)
    if rank == 0 and args.plot and plot(history, args.plot, args.moe_use_plugin) is not None:
        print(f"loss curve: {args.plot}", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return history


def write_json(args, history: dict, device) -> None:
    """The JSON log: this run's flags, the parts the history was trained in (``segments``),
    every iteration's loss / lr / gradient norm and the log lines' rows."""
    _make_parent(args.log_json)
    tmp = args.log_json + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"args": vars(args), "device": device.type, **history}, fh, indent=1)
    os.replace(tmp, args.log_json)


def _make_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)


def finish_profile(prof, path: str, rank: int, cuda: bool, out: Output) -> None:
    """Stops ``prof``; rank 0 writes the table of operators/kernels by device time."""
    if cuda:
        torch.cuda.synchronize()
    prof.stop()
    if rank == 0:
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
        _make_parent(path)
        with open(path, "w") as fh:
            fh.write(table)
        out.say("\n".join(table.splitlines()[:30]))


def save(args, model, opt, scheduler, iteration, consumed, history, out: Output):
    """A Megatron checkpoint of the run (moe_plugin.megatron.checkpoint), with rank 0's log
    history (the same on every rank: the checkpoint's common part is checked for that)."""
    shared = [history]
    dist.broadcast_object_list(shared, src=0)
    path = save_checkpoint(args.save, iteration, model, opt, scheduler,
                           consumed_train_samples=consumed, train_log=shared[0])
    out.say(f"saved {path}")


def plot(history: dict, path: str, plugin: bool):
    """The loss of every iteration, the log lines' interval averages over it, and a dotted
    line where a resumed part starts. Returns the figure (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path} (the log is in the JSON file)")
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    its = history["iterations"]
    ax.plot([r["iter"] for r in its], [r["loss"] for r in its], lw=0.8, alpha=0.6,
            label="every iteration")
    rows = history["log"]
    ax.plot([r["iter"] for r in rows], [r["loss"] for r in rows], marker="o", ms=3,
            label="average over the log interval")
    for seg in history["segments"][1:]:
        ax.axvline(seg["first_iter"] - 0.5, ls=":", color="grey")
    ax.set_xlabel("iteration")
    ax.set_ylabel("LM loss")
    ax.set_title(f"GPT-MoE pretraining ({'moe_plugin' if plugin else 'stock Megatron-Core'})")
    ax.legend()
    fig.tight_layout()
    _make_parent(path)
    fig.savefig(path, dpi=100)
    return fig


if __name__ == "__main__":
    main()
