"""Loading inputs safely: teachers (zoo, Hugging Face, ONNX, sandboxed code checkpoints), datasets,
archives, format sniffing, safetensors headers and weights, upload validation.

Nothing here trains or measures; every loader raises the typed `errors.InputError` family on a bad
file. Import the modules themselves (this package re-exports nothing).
"""
