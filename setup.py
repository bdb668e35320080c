from setuptools import find_packages, setup

setup(
    name="esd-jax",
    version="0.1.0",
    description="Erasing concepts from Stable Diffusion (ESD) in JAX, on TPU pods and GPUs, with export to PyTorch.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["esd_jax", "esd_jax.*"]),
    # The embedded toy pipeline (`--model toy`), a diffusers folder of about 8 MB.
    # The networks' configs of the hub models `esd-jax plan` knows without a download.
    package_data={
        "esd_jax.toy": ["pipeline/*.json", "pipeline/*/*.json", "pipeline/*/*.txt", "pipeline/*/*.safetensors"],
        "esd_jax": ["known_models/*/*.json", "known_models/*/*/*.json"],
    },
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "transformers>=4.40",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "numpy>=1.26",
        "scipy>=1.11",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pillow>=10",
    ],
    extras_require={
        # PyTorch is only the reference in tests and the loader check of exports; install the CPU
        # build first (`pip install torch==2.13.0`) or this pulls a multi-GB CUDA build.
        "torch": ["torch>=2.4", "diffusers>=0.35", "peft>=0.17"],
        # libtpu (through jax[tpu], about 140 MB) compiles for TPU topologies on any host: `esd-jax plan`.
        "tpu": ["jax[tpu]>=0.10"],
        # The judges of `esd-jax evaluate --prompts`: NudeNet's detector (its ONNX model ships in the wheel) on
        # onnxruntime, the classifier on PyTorch; CLIP runs on JAX and needs none of them.
        "eval": ["nudenet==3.4.2", "onnxruntime>=1.17", "torch>=2.4"],
        # The lpips and fid judges: torchmetrics on torchvision's AlexNet and torch-fidelity's Inception. torchvision
        # 0.28.0 is the release built for torch 2.13.0 (a newer one replaces torch); PyPI's is built for CUDA torch and
        # does not import beside a +cpu torch (and then neither does transformers' image processing: the classifier
        # judge), so it stays out of [eval]: with a +cpu torch, install PyTorch's CPU torchvision 0.28.0 first.
        "lpips-fid": ["torchmetrics>=1.9", "torchvision==0.28.0", "torch-fidelity>=0.4"],
        "test": [
            "torch>=2.4",
            "diffusers>=0.35",
            "pytest>=8",
            "chex>=0.1.90",
            "ruff>=0.6",
            "jax[tpu]>=0.10",
            "nudenet==3.4.2",
            "onnxruntime>=1.17",
            # The lpips and fid judges' checks before torchvision; what needs torchvision is skipped without it.
            "torchmetrics>=1.9",
            # diffusers' load_lora_weights, the reference loader of the LoRA exports, runs on PEFT.
            "peft>=0.17",
        ],
    },
    entry_points={"console_scripts": ["esd-jax=esd_jax.cli:main"]},
)
