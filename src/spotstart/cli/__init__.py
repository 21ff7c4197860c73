"""Thin command shells over the library: parse flags, build configs, render, map errors to exit
codes. Nothing imports this package."""
