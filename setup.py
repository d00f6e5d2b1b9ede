"""hstu: a gin-configured, distributed trainer for generative recommendation with HSTU.

Install with ``bash scripts/install.sh`` (it creates ``.venv``). torchrec and fbgemm are
installed by that script, not listed here: torchrec's own metadata asks for the CUDA build
of fbgemm-gpu, which does not load on hosts without a GPU driver, so the script picks
``fbgemm-gpu`` or ``fbgemm-gpu-cpu`` per host and installs torchrec with ``--no-deps``.
"""

from setuptools import find_packages, setup

setup(
    name="hstu",
    version="0.1.0",
    description="Distributed HSTU trainer for generative recommendation (ranking and retrieval)",
    packages=find_packages(include=["hstu", "hstu.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "gin-config==0.5.0",
        "torchmetrics==1.0.3",
        "numpy",
        "pyarrow",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "triton==3.9.0",
        "scikit-learn",  # k-means, TF-IDF and SVD of the semantic-id tokenizer (hstu.sid)
        "threadpoolctl",  # (scikit-learn's own dependency) one thread while hstu.sid fits
    ],
    extras_require={"dev": ["pytest", "pytest-timeout", "pytest-xdist", "ruff", "hypothesis"]},
)
