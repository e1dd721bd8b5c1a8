"""Generation and evaluation."""
