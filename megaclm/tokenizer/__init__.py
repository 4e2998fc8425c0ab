"""megaclm.tokenizer"""
