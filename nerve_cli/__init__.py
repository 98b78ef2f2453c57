"""nerve: eigenspectrum diagnostics of feed-forward layers across training checkpoints."""

__version__ = "0.1.0"
