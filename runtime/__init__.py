"""Engine.load() and the Classifier: not built yet."""
