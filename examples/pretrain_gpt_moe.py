"""Pretrain a Megatron-Core GPT-MoE model with torchrun; ``--moe-use-plugin`` runs every MoE
layer with moe_plugin's fused kernels, without it the model is stock Megatron-Core.

    # tiny default, CPU (gloo, Triton interpreter), 2 processes, about 3 minutes on 2 cores
    torchrun --nproc_per_node=2 examples/pretrain_gpt_moe.py --moe-use-plugin

    # on GPUs (NCCL, bf16); expert parallelism over 2 GPUs
    torchrun --nproc_per_node=2 examples/pretrain_gpt_moe.py --moe-use-plugin \\
        --num-layers 12 --hidden-size 1024 --num-attention-heads 16 --num-experts 8 \\
        --moe-ffn-hidden-size 1536 --seq-length 1024 --micro-batch-size 8 \\
        --global-batch-size 16 --expert-model-parallel-size 2 --train-iters 200

    # one GPU, the fastest settings (86.8k tokens/s for the 24-layer model of docs/megatron.md
    # on an H100, measured before the script used Megatron's distributed optimizer, with a
    # fused torch AdamW: not re-measured since): each micro-batch's forward + backward
    # replayed as one CUDA graph, and moe_plugin's cross entropy
    torchrun --nproc_per_node=1 examples/pretrain_gpt_moe.py --moe-use-plugin --cuda-graph \
        --cross-entropy triton ...

Data: Megatron's mock dataset by default (``MockGPTDataset``, no files needed); ``--data-path
PREFIX`` trains on a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``). Logs every
``--log-interval`` iterations: loss, the MoE aux losses (Megatron's tracker), tokens/s,
TFLOP/s per GPU (model FLOPs, formula in ``model_flops_per_token``) and peak memory. At the
end rank 0 writes the loss curve (``--plot``, PNG) and a JSON log (``--log-json``).
Training uses Megatron's own optimizer: ``get_megatron_optimizer`` with the distributed
optimizer (fp32 main parameters and Adam state sharded over the data-parallel ranks; bf16
parameters on GPUs) and ``OptimizerParamScheduler`` (linear warm-up, cosine decay).

``--save DIR`` / ``--load DIR`` write and read a Megatron checkpoint
(``moe_plugin.megatron.checkpoint``: ``dist_checkpointing`` of the model, the distributed
optimizer's state in its ``fully_reshardable`` format and the scheduler, plus the iteration and
the number of samples consumed; Megatron-LM's ``iter_NNNNNNN/`` and
``latest_checkpointed_iteration.txt`` layout). A resumed run continues exactly, and a
checkpoint moves between stock and ``--moe-use-plugin`` runs and between
``--expert-model-parallel-size`` values:

    torchrun --nproc_per_node=2 examples/pretrain_gpt_moe.py --train-iters 10 --save ckpt
    torchrun --nproc_per_node=2 examples/pretrain_gpt_moe.py --moe-use-plugin \
        --expert-model-parallel-size 2 --train-iters 20 --load ckpt --save ckpt
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # moe_plugin's kernels on the CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_plugin import patches  # noqa: E402  (megatron-core fixes, CPU shims: its README.md)

patches.apply()

from megatron.core import dist_checkpointing, parallel_state  # noqa: E402
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
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402

from moe_plugin.megatron import MoEPluginConfig, add_plugin_args, gpt_decoder_block_spec  # noqa
from moe_plugin.megatron import compat  # noqa: E402  (the aux-loss tracker of either version)
from moe_plugin.graphs import GraphedStep, side_stream  # noqa: E402
from moe_plugin.megatron.attention import with_sdpa_attention  # noqa: E402
from moe_plugin.megatron.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from moe_plugin.megatron.loss import use_fused_cross_entropy  # noqa: E402
from moe_plugin.quant import cache_quantized_weights  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="dense FFN size (default 4 × hidden)")
    g.add_argument("--num-experts", type=int, default=4)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=64)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-layer-freq", type=int, default=1,
                   help="every n-th layer is MoE (1: all)")
    g.add_argument("--first-dense-layers", type=int, default=0,
                   help="make the first n layers dense")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    g.add_argument("--moe-z-loss-coeff", type=float, default=1e-3)
    g.add_argument("--moe-router-score-function", default="softmax")
    g.add_argument("--vocab-size", type=int, default=256)
    g.add_argument("--seq-length", type=int, default=32)
    g = p.add_argument_group("parallelism and batch")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=2)
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=30)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=3,
                   help="linear warm-up from 0 (Megatron's OptimizerParamScheduler), then "
                        "cosine decay to --min-lr at --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 parameters (default on GPU)")
    g.add_argument("--fp32", dest="bf16", action="store_false")
    g = p.add_argument_group("data, checkpoints, logs")
    g.add_argument("--data-path", default=None,
                   help="Megatron indexed dataset prefix (default: mock data)")
    g.add_argument("--save", default=None, metavar="DIR",
                   help="write Megatron checkpoints (model, distributed optimizer, scheduler, "
                        "iteration, data position) to DIR/iter_NNNNNNN")
    g.add_argument("--save-interval", type=int, default=0, help="0: only at the end")
    g.add_argument("--load", default=None, metavar="DIR",
                   help="resume from DIR's latest checkpoint (DIR/latest_checkpointed_"
                        "iteration.txt), written by a stock or a plugin run at any "
                        "expert-parallel size")
    g.add_argument("--log-interval", type=int, default=5)
    g.add_argument("--plot", default="loss_curve.png")
    g.add_argument("--log-json", default="train_log.json")
    g.add_argument("--attention", choices=["sdpa", "megatron"], default="sdpa",
                   help="core attention: PyTorch's fused scaled_dot_product_attention "
                        "(moe_plugin.megatron.SDPAttention) or Megatron's unfused "
                        "DotProductAttention (the local spec's); the same for stock and plugin")
    g.add_argument("--profile", default=None, metavar="FILE",
                   help="profile two iterations (after --profile-start) with torch.profiler; "
                        "rank 0 writes the per-kernel table to FILE and prints its top rows")
    g.add_argument("--profile-start", type=int, default=5)
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
    add_plugin_args(p)
    args = p.parse_args(argv)
    if not 0 <= args.lr_warmup_iters < args.train_iters:
        p.error(f"--lr-warmup-iters {args.lr_warmup_iters}: must be >= 0 and smaller than "
                f"--train-iters {args.train_iters} (Megatron's scheduler decays after it)")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.bf16 is None:
        args.bf16 = torch.cuda.is_available()
    if args.cuda_graph:
        why = ("it needs CUDA" if not torch.cuda.is_available() else
               "it needs --moe-use-plugin (stock Megatron-Core's MoE layers read token counts "
               "on the host, which graph capture forbids)" if not args.moe_use_plugin else
               "it needs --expert-model-parallel-size 1 (the expert-parallel dispatch sizes "
               "its receive buffers on the host)" if args.expert_model_parallel_size != 1
               else None)
        if why:
            p.error(f"--cuda-graph: {why}")
    return args


def model_config(args) -> MoEPluginConfig:
    freq = [0 if (i < args.first_dense_layers or i % args.moe_layer_freq) else 1
            for i in range(args.num_layers)]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return MoEPluginConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        num_moe_experts=args.num_experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk, moe_layer_freq=freq,
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


def build_data(args, dp_rank: int, dp_size: int, num_samples: int):
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
    ``--train-iters``, constant weight decay; stepped once per iteration. On ``--load`` the
    schedule stays this run's (Megatron-LM's ``--override-opt_param-scheduler``: a run may
    resume with a larger ``--train-iters``); the checkpoint gives the step count."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.train_iters,
        lr_decay_style="cosine", start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def progress(it: int, total: int, text: str) -> None:
    width = 24
    done = int(width * it / total)
    sys.stdout.write(f"\r[{'#' * done}{'.' * (width - done)}] {it}/{total} {text}")
    sys.stdout.flush()


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB (RSS)


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = args.expert_model_parallel_size
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_step = args.micro_batch_size * dp_size
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"micro-batch × data-parallel size = {per_step}")
    num_micro = args.global_batch_size // per_step

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
    cache = None
    if args.moe_use_plugin and cfg.moe_plugin_quant:
        # FP8 experts: quantise each expert weight once per optimizer step (not per
        # micro-batch); the cache is refreshed after every opt.step() (which writes the
        # weights) and after a layer's load_state_dict
        cache = cache_quantized_weights(model, opt)
    start_iter, consumed = 0, 0
    if args.load:
        if not os.path.isfile(os.path.join(args.load, "latest_checkpointed_iteration.txt")):
            raise SystemExit(f"--load {args.load}: no latest_checkpointed_iteration.txt there "
                             f"(not a checkpoint directory written by --save)")
        common = load_checkpoint(args.load, model, opt, scheduler)
        start_iter, consumed = common["iteration"], common["consumed_train_samples"]
        if cache is not None:  # the optimizer's load wrote the weights' main copies too
            cache.refresh()
        if rank == 0:
            print(f"loaded {args.load} (iteration {start_iter}, {consumed} samples consumed)",
                  flush=True)
    data = build_data(args, dp_rank, dp_size,
                      num_samples=args.train_iters * args.global_batch_size + 1)
    flops_tok = model_flops_per_token(cfg, args.seq_length, args.vocab_size)
    tokens_per_iter = args.global_batch_size * args.seq_length
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"moe_plugin={'on' if args.moe_use_plugin else 'off (stock Megatron-Core)'}; "
              f"world {world} (EP {ep}, DP {dp_size}); params on rank 0: {n_params / 1e6:.2f}M; "
              f"{num_micro} micro-batches of {args.micro_batch_size} per rank per iteration; "
              f"device {device}", flush=True)
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
        for mod in model.modules():
            if isinstance(getattr(mod, "local_tokens_per_expert", None), torch.Tensor):
                mod.local_tokens_per_expert.zero_()
    log = []
    pending = None  # (iteration, loss on the host, copy-done event): read one step later
    t_last, it_last = time.time(), start_iter
    prof = None
    for it in range(start_iter, args.train_iters):
        if args.profile and it == args.profile_start:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else []))
            prof.start()
        if prof is not None and it == args.profile_start + 2:
            finish_profile(prof, args.profile, rank, cuda)
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
        # the loss goes to the host without stalling it: the progress bar shows a step's loss
        # once the next step is queued, so the host keeps the GPU's queue full
        if cuda:
            host = torch.empty((), dtype=loss_sum.dtype, pin_memory=True)
            host.copy_(loss_sum, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = loss_sum, None
        if pending is not None and rank == 0:
            progress(pending[0] + 1, args.train_iters, f"loss {_read(pending) / world:.4f}")
        pending = (it, host, done)
        if (it + 1) % args.log_interval == 0 or it + 1 == args.train_iters:
            loss_val = _read(pending) / world
            if rank == 0:
                progress(it + 1, args.train_iters, f"loss {loss_val:.4f}")
            pending = None
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
            row = {"iter": it + 1, "loss": loss_val, "grad_norm": float(gnorm), **aux,
                   "tokens_per_s": tok_s, "tflops_per_gpu": flops_tok * tok_s / world / 1e12,
                   "peak_mem_gib": peak_memory_gib(), "lr": lr}
            log.append(row)
            if rank == 0:
                aux_txt = " ".join(f"{k} {v:.4f}" for k, v in aux.items())
                print(f"\niter {it + 1:5d} | loss {loss_val:.4f} | {aux_txt} | "
                      f"grad norm {float(gnorm):.3f} | {tok_s:,.0f} tokens/s | "
                      f"{row['tflops_per_gpu']:.3g} TFLOP/s per GPU | "
                      f"peak mem {row['peak_mem_gib']:.2f} GiB", flush=True)
        if args.save and args.save_interval and (it + 1) % args.save_interval == 0:
            save(args, model, opt, scheduler, it + 1, consumed, rank)
    if prof is not None:  # the run ended inside the profiled window
        finish_profile(prof, args.profile, rank, cuda)
    saved_last = args.save_interval and args.train_iters % args.save_interval == 0
    if args.save and start_iter < args.train_iters and not saved_last:
        save(args, model, opt, scheduler, args.train_iters, consumed, rank)
    if rank == 0:
        print()
        if args.log_json:
            with open(args.log_json, "w") as fh:
                json.dump({"args": vars(args), "log": log}, fh, indent=1)
        if args.plot and log:
            plot(log, args.plot, args.moe_use_plugin)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return log


def _read(pending) -> float:
    """The loss of a queued step, waiting for its copy to the host only."""
    _, host, done = pending
    if done is not None:
        done.synchronize()
    return float(host)


def finish_profile(prof, path: str, rank: int, cuda: bool) -> None:
    """Stops ``prof``; rank 0 writes the table of operators/kernels by device time."""
    if cuda:
        torch.cuda.synchronize()
    prof.stop()
    if rank == 0:
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
        with open(path, "w") as fh:
            fh.write(table)
        print("\n" + "\n".join(table.splitlines()[:30]), flush=True)


def save(args, model, opt, scheduler, iteration, consumed, rank):
    """A Megatron checkpoint of the run (moe_plugin.megatron.checkpoint)."""
    path = save_checkpoint(args.save, iteration, model, opt, scheduler,
                           consumed_train_samples=consumed)
    if rank == 0:
        print(f"\nsaved {path}", flush=True)


def plot(log, path, plugin):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path} (the log is in the JSON file)")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["iter"] for r in log], [r["loss"] for r in log], marker="o")
    ax.set_xlabel("iteration")
    ax.set_ylabel("LM loss")
    ax.set_title(f"GPT-MoE pretraining ({'moe_plugin' if plugin else 'stock Megatron-Core'})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"loss curve: {path}")


if __name__ == "__main__":
    main()
