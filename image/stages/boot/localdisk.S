/* localdisk.bs: "boot from first local disk" for isolinux (BIOS), CD and USB alike.
 *
 * isolinux loads this file at 0000:7C00 and jumps to it in real mode (BOOT keyword). It boots the
 * first BIOS hard disk (0x80, 0x81, ... up to the count in the BIOS data area) whose MBR is
 * readable, ends in 55AA and does NOT carry this ISO's MBR disk id (bytes 440-443; the ISO stage
 * writes its id into `own_id`). Started from a CD, the medium is no BIOS hard disk and the first
 * disk is 0x80; started from a USB stick (or any disk holding this image), that disk is skipped.
 * `LOCALBOOT 0x80` cannot do this: from a USB stick 0x80 is the stick itself.
 * With no such disk it says so (screen and COM1) and hands back to the BIOS (INT 18h: next boot device).
 *
 * Assembled with: as --32 -o localdisk.o localdisk.S && ld -m elf_i386 -Ttext=0x600 --oformat binary
 * (image/localdisk.py holds the bytes; tests/test_localdisk.py re-assembles this file and compares).
 */
	.code16
	.text
	.globl	_start
_start:
	cli
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	$0x7c00, %sp
	sti
	cld
	/* Move out of 0x7C00, where each candidate MBR is read: run from 0x0600 (linked there). */
	movw	$0x7c00, %si
	movw	$0x0600, %di
	movw	$256, %cx
	rep movsw
	ljmp	$0, $relocated
relocated:
	movb	$0x80, %dl
next_drive:
	movb	0x475, %al		/* number of BIOS hard disks (BDA 0040:0075) */
	addb	$0x80, %al
	cmpb	%al, %dl
	jae	none
	pushw	%dx
	movw	$0x0201, %ax		/* INT 13h AH=02h: read 1 sector */
	movw	$0x0001, %cx		/* cylinder 0, sector 1 (LBA 0) */
	xorb	%dh, %dh		/* head 0 */
	movw	$0x7c00, %bx		/* to 0000:7C00 */
	int	$0x13
	popw	%dx
	jc	skip
	cmpw	$0xaa55, 0x7dfe
	jne	skip
	movl	0x7db8, %eax		/* the candidate's disk id */
	cmpl	own_id, %eax
	je	skip			/* this medium (or a copy of it) */
	ljmp	$0, $0x7c00		/* boot it, DL = its drive number */
skip:
	incb	%dl
	jmp	next_drive
none:
	movw	$message, %si
print:
	lodsb
	testb	%al, %al
	jz	give_up
	movb	$0x0e, %ah		/* INT 10h teletype */
	movw	$0x0007, %bx
	int	$0x10
	movb	%al, %ah
	movw	$0x3fd, %dx		/* COM1 line status: wait for an empty transmitter */
wait_tx:
	inb	%dx, %al
	testb	$0x20, %al
	jz	wait_tx
	movb	%ah, %al
	movw	$0x3f8, %dx
	outb	%al, %dx
	jmp	print
give_up:
	int	$0x18			/* let the BIOS try its next boot device */
	hlt
	jmp	give_up
own_id:
	.long	0			/* the ISO's MBR disk id (patched by the ISO stage) */
message:
	.asciz	"failback: no local hard disk to boot (other than this medium)\r\n"
	.org	510
	.word	0xaa55
