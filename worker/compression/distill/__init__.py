"""Training: the distillation losses, the resumable training loop, the teacher-output cache,
knowledge distillation with its labels-only baseline, and quantization-aware distillation.

Import the modules themselves (this package re-exports nothing).
"""
