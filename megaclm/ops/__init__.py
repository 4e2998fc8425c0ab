"""megaclm.ops"""
