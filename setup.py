import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(
    r'^__version__ = "([^"]+)"', (here / "fastguide" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="fastguide",
    version=version,
    description="Fused centered-Gram / CKA ops and a representational-guidance training wrapper for PyTorch",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` is installed as `fastguide.kernels`: a top-level `kernels` package collides on PyPI.
    packages=["fastguide", *(f"fastguide.{p}" for p in find_packages("fastguide")), "fastguide.kernels"],
    package_dir={"fastguide": "fastguide", "fastguide.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton", "numpy", "scipy", "threadpoolctl"],
    extras_require={
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
        # Optional integrations (fastguide.integrations); none pulls torchvision or another torch.
        "integrations": ["lightning", "transformers", "accelerate"],
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "scikit-learn",
            "matplotlib",
            "tqdm",
            "lightning",
            "transformers",
            "accelerate",
        ],
        "peers": ["pytorch-cka", "ckatorch"],
        "dev": ["ruff"],
    },
    entry_points={"console_scripts": ["fastguide=fastguide.cli:main"]},
)
