"""Loading task data: labelled text for classification, text corpora for language modelling."""
