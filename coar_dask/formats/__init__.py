"""Other on-disk formats: FFCV .beton and the seed's .npy layout.
"""
