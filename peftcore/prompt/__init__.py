"""Prompt tuning, P-tuning and prefix tuning: their configs and encoders."""
