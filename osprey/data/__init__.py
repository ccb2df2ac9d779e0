"""Instruction data: Osprey-724K records (records.py), training samples and datasets built on them."""
