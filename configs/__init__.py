"""The sparsity presets (``<name>.yaml``). This folder sits at the top of the repository and is
installed as the package ``sparse_unsloth.configs`` (``package-dir`` in pyproject.toml)."""
