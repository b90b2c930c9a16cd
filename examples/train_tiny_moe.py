"""A small runnable training example: a tiny MoE language model on synthetic data.

Runs on a CUDA GPU (compiled Triton kernels) or on the CPU (the same kernels under the
Triton interpreter, fp32). Every MoE block calls ``moe_plugin.fused_moe`` with the load-balance
and z losses; the loss should fall within the default 30 steps.

    python examples/train_tiny_moe.py               # CPU: about a minute on 2 cores
    python examples/train_tiny_moe.py --steps 200 --d-model 512 --experts 32   # on a GPU
"""
import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # run the Triton kernels on the CPU

import moe_plugin  # noqa: E402  (after TRITON_INTERPRET is set)


class MoEBlock(torch.nn.Module):
    def __init__(self, d, f, e, k, dtype, device):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d, device=device, dtype=dtype)
        self.gate = torch.nn.Parameter(torch.randn(e, d, device=device, dtype=dtype) * 0.02)
        self.w_up = torch.nn.Parameter(torch.randn(e, 2 * f, d, device=device, dtype=dtype) / d ** 0.5)
        self.w_down = torch.nn.Parameter(torch.randn(e, d, f, device=device, dtype=dtype) / f ** 0.5)
        self.k = k

    def forward(self, x):
        h = self.norm(x).reshape(-1, x.shape[-1])
        out, info = moe_plugin.fused_moe(h, self.gate, self.w_up, self.w_down, self.k,
                                         aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
        return x + out.view_as(x), info


class TinyMoELM(torch.nn.Module):
    def __init__(self, vocab, d, f, e, k, layers, dtype, device):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d, device=device, dtype=dtype)
        self.blocks = torch.nn.ModuleList(MoEBlock(d, f, e, k, dtype, device) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab, device=device, dtype=dtype)

    def forward(self, tokens):
        x = self.emb(tokens)
        aux = x.new_zeros((), dtype=torch.float32)
        for blk in self.blocks:
            x, info = blk(x)
            aux = aux + info["aux_loss"] + info["z_loss"]
        return self.head(x).float(), aux, info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=32)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = TinyMoELM(args.vocab, args.d_model, args.ffn, args.experts, args.top_k,
                      args.layers, dtype, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    # synthetic task: predict the next token of a fixed random permutation walk
    perm = torch.randperm(args.vocab, device=device)
    first = None
    t0 = time.time()
    for step in range(1, args.steps + 1):
        start = torch.randint(0, args.vocab, (args.batch, 1), device=device)
        seq = [start]
        for _ in range(args.seq):
            seq.append(perm[seq[-1]])
        seq = torch.cat(seq, 1)
        logits, aux, info = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), seq[:, 1:].reshape(-1))
        (loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
        if step % 5 == 0 or step == 1:
            tok_s = step * args.batch * args.seq / (time.time() - t0)
            load = info["tokens_per_expert"].tolist()
            print(f"step {step:4d}  loss {loss.item():.4f}  aux+z {aux.item():.4f}  "
                  f"tokens/s {tok_s:.0f}  tokens/expert (last layer) {load}", flush=True)
    print(f"done on {device}: loss {first:.4f} -> {loss.item():.4f}")


if __name__ == "__main__":
    main()
