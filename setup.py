"""maskllm_megatron: learnable N:M sparsity (MaskLLM) as a megatron-core extension."""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("maskllm_megatron/__init__.py").read_text(), version)

setup(
    name="maskllm_megatron",
    version=version["__version__"],
    description="Learnable N:M semi-structured sparsity (MaskLLM) for megatron-core models",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["maskllm_megatron", "maskllm_megatron.*"]),
    package_data={"maskllm_megatron.sampling": ["*.cpp"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "numpy",
        "packaging>=24.2",
        "psutil",  # megatron-core's dist_checkpointing needs it and does not declare it
        "safetensors",
        "sentencepiece",
        "tqdm",
        "pyyaml",
        "matplotlib",  # loss / flip-rate curves
        "tensorboard",  # training scalars
    ],
    extras_require={
        # triton runs the fused kernel's tests on CPU (TRITON_INTERPRET=1); GPU images ship it
        "dev": ["pytest>=8", "pytest-timeout", "ruff", "triton"],
        "hf": ["transformers"],
        # maskllm eval-tasks: lm-evaluation-harness with what its hf model needs (datasets,
        # accelerate, ...); pinned, as the adapter follows its HFLM's tokenisation exactly
        "eval": ["lm_eval[hf]==0.4.13"],
    },
    entry_points={"console_scripts": ["maskllm = maskllm_megatron.cli:main"]},
)
