"""Test-wide settings: one torch thread per test process (the suite runs under xdist workers;
tiny models are faster single-threaded and the timing stays stable on a busy 2-core machine)."""

import torch

torch.set_num_threads(1)
