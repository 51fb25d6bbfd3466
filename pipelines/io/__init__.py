"""Files: the A1111 infotext and PNG metadata, saving images, file hashes."""
