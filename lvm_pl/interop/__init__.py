"""Conversions between lvm-pl checkpoints and other libraries' formats."""
