from setuptools import find_packages, setup

setup(
    name="moe_plugin",
    version="0.1.0",
    description="Fused Triton Mixture-of-Experts training layers for PyTorch and Megatron-Core",
    packages=find_packages(include=["moe_plugin", "moe_plugin.*"]),
    python_requires=">=3.10",
    # Deliberately loose: the GPU machines bring their own torch/triton; CI pins a CPU torch.
    install_requires=["torch>=2.6", "triton>=3.2", "numpy"],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout"],
        # megatron-core 0.16.1 (Python >= 3.10) and 0.19.x (Python >= 3.12) are tested
        # tqdm: the example's progress bar; tensorboard: its --tensorboard-dir
        "megatron": ["megatron-core>=0.16.1,<0.20", "psutil", "matplotlib", "tqdm",
                     "tensorboard"],
        "bench": ["matplotlib"],
    },
)
