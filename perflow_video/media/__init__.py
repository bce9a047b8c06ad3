"""Video files in and out: decoding frames (decord or PyAV) and writing GIF / MP4 clips."""
