"""DPO alignment pipeline for an emotion-aware chatbot's response generator."""

# The seven DailyDialog emotions, in the label order the reference classifier uses.
EMOTIONS = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
