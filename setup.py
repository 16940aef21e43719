"""sparse_upcycle: sparse upcycling of dense Transformers into Mixture-of-Experts models."""

from setuptools import find_packages, setup

setup(
    name="sparse_upcycle",
    version="0.1.0",
    description="Turn trained dense Transformers into sparse Mixture-of-Experts models (JAX/Flax).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sparse_upcycle", "sparse_upcycle.*"]),
    # Every third-party module that sparse_upcycle/ imports, with the ranges we test with (CI
    # installs the newest release inside each range); tests/test_imports.py checks the list.
    install_requires=[
        "jax>=0.10.0,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml_collections>=1.1,<2",
        "numpy>=2.0,<3",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "grain>=0.2.12,<0.3",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.21,<0.24",
        "matplotlib>=3.8,<4",
        "safetensors>=0.4,<1",
        "tensorstore>=0.1.60,<0.2",
        "ml_dtypes>=0.5,<0.8",
        "PyYAML>=6,<7",  # mergekit-moe configs (upcycle --mergekit-yaml)
        "gin-config>=0.5,<0.6",  # imported as `gin`: T5X gin files (--gin_file; its parser)
        "scikit-learn>=1.5,<2",  # its bundled digits: the few-shot probe's data (fewshot.py)
        "scipy>=1.11,<2",  # the paired t-test of compare's verdicts (report.py)
    ],
    extras_require={
        # torch==2.13.0 is pinned exactly: it is the CPU build on the development machines (a
        # looser range would pull a multi-GB CUDA build); HF transformers is the independent
        # implementation our parity tests compare against.
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",  # the suite in two processes (README, .ci/run)
            "ruff>=0.15,<0.18",
            # pyright's PyPI wheel bundles the checker; [nodejs] brings node as a PyPI wheel too
            # (no download at run time). Pinned exactly: a new release can add diagnostics.
            "pyright[nodejs]==1.1.414",
            "pre-commit>=4,<5",
            "torch==2.13.0",
            "transformers>=5.0,<6",
        ],
    },
    entry_points={"console_scripts": ["sparse-upcycle=sparse_upcycle.cli:entry"]},
)
