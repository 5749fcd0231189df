"""Pure-torch PCIM engine: tensors and a forward callable in, tensors out. No file paths here."""
