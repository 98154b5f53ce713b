"""The `asymlora` sub-commands: argument parsing and printing around library calls, one module per group.

Each module defines ``register_cli(subparsers)`` (``models`` defines one per command); :mod:`asymlora.cli`
lists them. Command modules import the library lazily inside their handlers where it is heavy (torch,
transformers), so ``asymlora --help`` starts fast; no library module imports a command module.
"""
