"""The EMA's method card, ``README.md`` beside this file, installed with emakit; the EMA is :class:`emakit.EMA`."""
