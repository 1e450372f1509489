"""Training stage: fits a character-level RNN (RNN, GRU or LSTM) in PyTorch. Run as `python -m train`."""
