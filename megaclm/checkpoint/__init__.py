"""megaclm.checkpoint"""
