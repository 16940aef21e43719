"""sparse_upcycle: turn dense Transformers into sparse Mixture-of-Experts models and train them."""

__version__ = "0.1.0"
