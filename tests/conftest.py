import os

import torch

# Triton kernels run under the interpreter on CPU-only machines; the flag must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
