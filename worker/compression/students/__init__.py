"""Students: the zoo architectures, transformers encoders, and the factory that makes a smaller model
for a teacher (derived from it, a zoo architecture, a transformers config, or sized to a budget),
including the shrinking of transformers (layers, hidden width, vocabulary) the search ladders use.

Import the modules themselves (this package re-exports nothing).
"""
