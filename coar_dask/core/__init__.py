"""Pure data and rules: spec, store, masks, experiment, components, outputs, verify.

No distributed, argparse or matplotlib here.
"""
