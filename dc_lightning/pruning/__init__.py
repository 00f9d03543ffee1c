"""Pruning [NIPS 2015]: magnitude masks, schedules, dropout adjustment, the sensitivity sweep."""
