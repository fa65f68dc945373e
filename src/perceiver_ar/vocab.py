"""The official token id scheme, shared by every tokenizer, data set and the model.

PAD = 0, EOS = 1, SOS = 2; data token k (a byte, a pixel value, a MIDI event,
an audio level) has id k + 3. Rows are right-padded with PAD.
"""

PAD_ID = 0
EOS_ID = 1
SOS_ID = 2
TOKEN_OFFSET = 3  # data token k has id k + 3
