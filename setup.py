"""ilmil: class-incremental object detection on detectron2 (MFRRK distillation)."""
from setuptools import find_packages, setup

setup(
    name="ilmil",
    version="0.1.0",
    description="Class-incremental object detection with multi-layer, RPN and RCN "
    "knowledge distillation on detectron2",
    packages=find_packages(include=("ilmil", "ilmil.*")),
    python_requires=">=3.10",
    # detectron2 is not on PyPI under its own name: tools/bootstrap.sh installs it.
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy",
        "pillow",
        "pycocotools>=2.0.2",
        "matplotlib",
        "tqdm",
        "onnx",
        "onnxruntime",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
    ],
)
