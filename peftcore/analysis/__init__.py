"""What an adapter learned and how well it does: low-rank spectra, base weights, prompt statistics,
training-time statistics, plots, perplexity and text metrics."""
