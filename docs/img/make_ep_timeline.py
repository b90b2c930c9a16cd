"""Draws docs/img/ep_timeline.png: the stream schedule of one MoE layer under expert
parallelism (a schematic of what runs where and what waits on what; not a measurement)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LANES = ["compute stream", "side stream", "NCCL stream", "host"]
FWD = [  # lane, start, length, label
    ("compute stream", 0.0, 1.0, "router +\nlayout"),
    ("host", 1.0, 0.3, "counts\n(1 sync)"),
    ("compute stream", 1.3, 0.6, "pack"),
    ("NCCL stream", 1.9, 2.0, "dispatch a2a"),
    ("side stream", 0.2, 3.4, "shared expert fwd"),
    ("compute stream", 3.9, 3.0, "local experts fwd"),
    ("NCCL stream", 6.9, 2.0, "combine a2a"),
    ("compute stream", 8.9, 0.5, "k-way sum\n+ shared"),
]
BWD = [
    ("compute stream", 10.0, 0.5, "gather dout"),
    ("NCCL stream", 10.5, 2.0, "a2a (combine bwd)"),
    ("side stream", 10.1, 3.0, "shared expert bwd"),
    ("compute stream", 12.5, 2.2, "experts: dx, d(w)"),
    ("NCCL stream", 14.7, 2.0, "a2a (dispatch bwd)"),
    ("compute stream", 14.7, 2.6, "dW_up, dW_down"),
    ("compute stream", 17.3, 0.5, "dx sum"),
    ("compute stream", 17.8, 0.8, "router bwd"),
]
COLORS = {"compute stream": "#4C72B0", "side stream": "#55A868", "NCCL stream": "#C44E52",
          "host": "#8172B2"}


def main():
    fig, ax = plt.subplots(figsize=(13, 3.2))
    for lane, start, length, label in FWD + BWD:
        y = len(LANES) - 1 - LANES.index(lane)
        ax.barh(y, length, left=start, color=COLORS[lane], edgecolor="k", height=0.6)
        if length >= 0.9:
            ax.text(start + length / 2, y, label, ha="center", va="center", fontsize=7,
                    color="white")
        else:  # too narrow: label above the bar
            ax.text(start + length / 2, y + 0.33, label.replace("\n", " "), ha="center",
                    va="bottom", fontsize=6)
    ax.axvline(9.7, color="k", ls=":", lw=1)
    ax.text(4.8, 3.55, "forward", ha="center")
    ax.text(14.3, 3.55, "backward", ha="center")
    ax.set_yticks(range(len(LANES)))
    ax.set_yticklabels(LANES[::-1])
    ax.set_xticks([])
    ax.set_ylim(-0.6, 3.8)
    ax.set_title("Expert parallelism: stream schedule of one MoE layer (schematic, not to scale)")
    fig.tight_layout()
    fig.savefig("docs/img/ep_timeline.png", dpi=110)


if __name__ == "__main__":
    main()
