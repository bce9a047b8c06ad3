"""Training data: captioned video clips (CSV or folder) and captioned images, with a bad-input policy."""
