"""Architectures of the zoo, one module per family; build them by name with
``encoders.distill.zoo.create_model``."""
