"""Pure ML for capfleet: data, text, images, metrics, the captioner and its bundles. No Ray here."""
