# help2man's page begins its DESCRIPTION with the program's "usage: ..."
# lines (it looks for "Usage:"): make them the SYNOPSIS.
state == 0 && /^\.SH DESCRIPTION$/ {
    if ((getline usage) > 0 && usage ~ /^usage: /) {
        print ".SH SYNOPSIS"
        print substr(usage, 8)
        state = 1
        next
    }
    print
    print usage
    state = 2
    next
}
state == 1 && /^\.(PP|SS)/ {
    print ".SH DESCRIPTION"
    state = 2
    if ($0 == ".PP")
        next
}
{ print }
