"""``python -m maskllm_megatron.cli``: what torchrun and the launch scripts start."""

import sys

from maskllm_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main())
